"""The work directory of a curation run: its plan, its units of work and their completion, shared
by the processes of one or several nodes through the file system.

A run is a sequence of phases; a phase is a list of units (input parts or hash buckets), each a
pure function of files written by earlier phases. Unit U of a phase is done by rank U % WORLD,
in this rank's worker processes, and is marked done only after its files are complete (written
under temporary names, then renamed). A phase ends when every unit is marked done, so:

- the output does not depend on the number of nodes or workers (a unit's result does not);
- an interrupted run is resumed by running the same command again: the plan is checked against
  the inputs and config, and finished units are not redone.

Rank and world size come from `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS), `mpirun`/PMIx or
torchrun's variables (`parallel.rank_env`); every rank needs the output's parent directory on a
shared file system.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

FAULT_ENV = "MEGATRON_EXT_CURATE_EXIT_AFTER"  # tests: exit hard after this phase's units


def ranks(environ=None) -> tuple[int, int]:
    """(rank, world size) of this process among the run's processes."""
    from megatron_ext.parallel.rank_env import dist_env

    env = os.environ if environ is None else environ
    d = dist_env(env)
    world = d.world_size
    if d.source == "slurm":
        # a batch script's own shell sees SLURM_NTASKS of the allocation but is one process;
        # a task started by srun sees its step's task count
        world = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if world > 1:
        log.info("curate: rank %d of %d (%s)", d.rank, world, d.source)
    return d.rank, world


@dataclass
class Work:
    root: Path
    rank: int = 0
    world: int = 1
    workers: int = 1

    def __post_init__(self) -> None:
        self.started = time.time()  # failure markers older than this are a former attempt's
        self.units_done = 0

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ------------------------------------------------------------ the plan

    def agree_on_plan(self, plan: dict) -> dict:
        """Rank 0 writes PLAN (or checks it against a resumed run's); the others read it."""
        target = self.path("plan.json")
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if target.exists():
                old = json.loads(target.read_text())
                if old != plan:
                    raise UserError(
                        f"{self.root} holds an unfinished run with other inputs or another "
                        "config: run that command again to finish it, or remove the directory"
                    )
                log.info("curate: resuming the unfinished run in %s", self.root)
            else:
                write_atomic(target, json.dumps(plan, indent=1).encode())
            return plan
        self._wait(lambda: target.exists(), f"{target} (rank 0 writes it)")
        got = json.loads(target.read_text())
        if got != plan:
            raise UserError(f"rank {self.rank}: {target} differs from this rank's plan")
        return got

    # ------------------------------------------------------------ phases

    def done_marker(self, phase: str, unit: int) -> Path:
        return self.path("done", f"{phase}.{unit}")

    def run_phase(self, phase: str, units: Iterable[int], fn: Callable, *args) -> None:
        """FN(*ARGS, unit) for this rank's units of PHASE not yet done; then wait for all."""
        units = list(units)
        self.path("done").mkdir(parents=True, exist_ok=True)
        mine = [u for u in units if u % self.world == self.rank]
        todo = [u for u in mine if not self.done_marker(phase, u).exists()]
        if len(todo) < len(mine):
            log.info("curate: %s: %d of %d units already done", phase, len(mine) - len(todo),
                     len(mine))  # fmt: skip
        try:
            if self.workers > 1 and len(todo) > 1:
                with ProcessPoolExecutor(min(self.workers, len(todo))) as pool:
                    for unit, _ in zip(todo, pool.map(fn, *([a] * len(todo) for a in args), todo),
                                       strict=True):  # fmt: skip
                        self._mark(phase, unit)
            else:
                for unit in todo:
                    fn(*args, unit)
                    self._mark(phase, unit)
            self.units_done += len(todo)
            host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
            mine_done = {"rank": self.rank, "host": host, "units": self.units_done}
            write_atomic(self.path("ranks", f"{self.rank}.json"), json.dumps(mine_done).encode())
        except BaseException as exc:
            if self.world > 1:  # the other ranks would wait for this rank's units
                reason = str(exc) or type(exc).__name__
                write_atomic(self.path("failed", f"rank{self.rank}"), reason.encode())
            raise
        self._wait(
            lambda: all(self.done_marker(phase, u).exists() for u in units),
            f"the other ranks' units of {phase}",
        )
        if os.environ.get(FAULT_ENV) == phase:
            log.error("curate: %s=%s: exiting after it", FAULT_ENV, phase)
            os._exit(9)

    def _mark(self, phase: str, unit: int) -> None:
        write_atomic(self.done_marker(phase, unit), b"")

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        delay, said = 0.02, time.time()
        failed = self.path("failed")
        while not ready():
            for f in sorted(failed.glob("rank*")) if failed.exists() else []:
                if f.stat().st_mtime >= self.started - 1:
                    raise UserError(f"curate: {f.name} failed: {f.read_text()}")
            if time.time() - said > 60:
                log.info("curate: rank %d still waiting for %s", self.rank, what)
                said = time.time()
            time.sleep(delay)
            delay = min(0.5, delay * 2)

    def rank_records(self) -> list[dict]:
        """Each rank's host and the units it did in this attempt."""
        files = [self.path("ranks", f"{r}.json") for r in range(self.world)]
        return [json.loads(f.read_text()) for f in files if f.exists()]

    def end(self) -> None:
        """Every rank is past the last phase (rank 0 waits for that before it removes the work
        directory, which the others poll)."""
        if self.world == 1:
            return
        write_atomic(self.path("ends", str(self.rank)), b"")
        if self.rank == 0:
            ends = [self.path("ends", str(r)) for r in range(1, self.world)]
            self._wait(
                lambda: all(e.exists() and e.stat().st_mtime >= self.started - 1 for e in ends),
                "the other ranks to finish",
            )

    def finish(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_array(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def load_arrays(paths: Iterable[Path], columns: int, dtype=np.uint64) -> np.ndarray:
    """The rows of the .npy files at PATHS, concatenated ([0, COLUMNS] when there is none)."""
    parts = [np.load(p) for p in paths]
    parts = [p for p in parts if len(p)]
    if not parts:
        return np.zeros((0, columns), dtype=dtype)
    return np.concatenate(parts)


class RecordWriter:
    """Pickled records appended to a file that appears under its name when closed."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.f = open(self.tmp, "wb")  # noqa: SIM115 (closed by close())
        self.pickler = pickle.Pickler(self.f, protocol=pickle.HIGHEST_PROTOCOL)

    def write(self, record) -> None:
        self.pickler.dump(record)
        self.pickler.clear_memo()

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)


def read_records(path: Path):
    with open(path, "rb") as f:
        unpickler = pickle.Unpickler(f)
        while True:
            try:
                yield unpickler.load()
            except EOFError:
                return
