"""The work directory of a curation run: its plan, its units of work and their completion, shared
by the processes of one or several nodes through the file system.

A run is a sequence of phases; a phase is a list of units (input parts or hash buckets), each a
pure function of files written by earlier phases. Unit U of a phase is done by rank U % WORLD,
in this rank's worker processes, and is marked done only after its files are complete (written
under temporary names, then renamed). A phase ends when every unit is marked done, so:

- the output does not depend on the number of nodes or workers (a unit's result does not);
- an interrupted run is resumed by running the same command again: the plan (inputs with their
  sizes and times, config, evaluation data, format) is checked, and finished units are not
  redone; a run whose plan changed starts over.

Rank and world size come from `srun` (SLURM_PROCID, SLURM_STEP_NUM_TASKS), `mpirun`/PMIx or
torchrun's variables (`parallel.rank_env`); every rank needs the output's parent directory on a
shared file system. The ranks of one attempt share an id from the launcher (Slurm job and step,
the MPI job's namespace, or MEGATRON_EXT_CURATE_ATTEMPT): a failure marker or an end marker of an
earlier attempt is never taken for this one's. A rank that fails writes a failure marker, so the
others stop; a rank that dies without one (killed, node lost) stops touching its heartbeat, and
the others stop after `PEER_TIMEOUT_S` without one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

FAULT_ENV = "MEGATRON_EXT_CURATE_EXIT_AFTER"  # tests: exit hard after this phase's units
ATTEMPT_ENV = "MEGATRON_EXT_CURATE_ATTEMPT"
PEER_TIMEOUT_ENV = "MEGATRON_EXT_CURATE_PEER_TIMEOUT_S"
PEER_TIMEOUT_S = 600.0  # a rank's heartbeat unchanged this long: it died
HEARTBEAT_S = 10.0


def ranks(environ=None) -> tuple[int, int, str]:
    """(rank, world size, attempt id) of this process among the run's processes."""
    from megatron_ext.parallel.rank_env import dist_env

    env = os.environ if environ is None else environ
    d = dist_env(env)
    world = d.world_size
    if d.source == "slurm":
        # a batch script's own shell sees SLURM_NTASKS of the allocation but is one process;
        # a task started by srun sees its step's task count
        world = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if world == 1:
        return 0, 1, f"single-{os.getpid()}"
    attempt = env.get(ATTEMPT_ENV)
    if not attempt and d.source == "mpi":
        attempt = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_ess_base_jobid")
    if not attempt and env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID"):
        parts = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT")
        attempt = "slurm-" + ".".join(env.get(k, "0") for k in parts)
    if not attempt:
        raise UserError(
            f"curate on {world} ranks ({d.source}) found no job id of the launcher: set "
            f"{ATTEMPT_ENV} to a value unique to this run on every rank"
        )
    log.info("curate: rank %d of %d (%s, attempt %s)", d.rank, world, d.source, attempt)
    return d.rank, world, attempt.replace("/", "_")


@dataclass
class Work:
    root: Path
    rank: int = 0
    world: int = 1
    workers: int = 1
    attempt: str = "single"
    units_done: int = 0
    _lock: object = field(default=None, repr=False)
    _peers: dict = field(default_factory=dict, repr=False)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # ------------------------------------------------------------ the plan

    def agree_on_plan(self, plan: dict) -> None:
        """Rank 0 takes the work directory (one run at a time) and writes PLAN, resuming a run
        with the same plan or starting over from one with another; the others wait for it."""
        target = self.path("plan.json")
        if self.world > 1:
            self._start_heartbeat()
        if self.rank != 0:
            self._wait(lambda: target.exists() and json.loads(target.read_text()) == plan,
                       f"{target} (rank 0 writes it)")  # fmt: skip
            return
        from megatron_ext.filelock import take_lock

        self._lock, holder = take_lock(self.path(".run.lock"))
        if self._lock is None:
            raise UserError(f"{self.root} is in use by another curate run ({holder})")
        if target.exists():
            if json.loads(target.read_text()) == plan:
                log.info("curate: resuming the unfinished run in %s", self.root)
                return
            log.warning("curate: %s holds an unfinished run with other inputs, config or "
                        "version: starting over", self.root)  # fmt: skip
            for child in self.root.iterdir():
                if not child.name.startswith(".run.lock"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        write_atomic(target, json.dumps(plan, indent=1).encode())

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
        if self.workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(self.workers, len(todo))) as pool:
                pending = {pool.submit(fn, *args, u): u for u in todo}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                    for future in finished:
                        unit = pending.pop(future)
                        if future.exception() is not None:
                            self.fail(future.exception())  # the others stop now, not later
                            pool.shutdown(wait=False, cancel_futures=True)
                            raise future.exception()
                        self._mark(phase, unit)
        else:
            for unit in todo:
                fn(*args, unit)
                self._mark(phase, unit)
        self.units_done += len(todo)
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        mine_done = {"rank": self.rank, "host": host, "units": self.units_done}
        write_atomic(self.path("ranks", f"{self.rank}.json"), json.dumps(mine_done).encode())
        self._wait(
            lambda: all(self.done_marker(phase, u).exists() for u in units),
            f"the other ranks' units of {phase}",
        )
        if os.environ.get(FAULT_ENV) == phase:
            log.error("curate: %s=%s: exiting after it", FAULT_ENV, phase)
            os._exit(9)

    def _mark(self, phase: str, unit: int) -> None:
        write_atomic(self.done_marker(phase, unit), b"")

    def fail(self, exc: BaseException) -> None:
        """Tell the other ranks that this one failed (they would wait for its units)."""
        if self.world > 1:
            reason = str(exc) or type(exc).__name__
            write_atomic(self.path("failed", f"{self.attempt}.{self.rank}"), reason.encode())

    # ------------------------------------------------------------ waiting

    def _start_heartbeat(self) -> None:
        beat = self.path("alive", f"{self.attempt}.{self.rank}")

        def touch() -> None:
            while True:
                try:
                    write_atomic(beat, str(time.time()).encode())
                except OSError:
                    pass  # the work directory is being replaced or removed
                time.sleep(HEARTBEAT_S)

        threading.Thread(target=touch, name="curate-heartbeat", daemon=True).start()

    def _check_peers(self) -> None:
        failed = sorted(self.path("failed").glob(f"{self.attempt}.*"))
        if failed:
            rank = failed[0].name.rsplit(".", 1)[1]
            raise UserError(f"curate: rank {rank} failed: {failed[0].read_text()}")
        timeout = float(os.environ.get(PEER_TIMEOUT_ENV, PEER_TIMEOUT_S))
        now = time.monotonic()
        for r in range(self.world):
            if r == self.rank:
                continue
            beat = self.path("alive", f"{self.attempt}.{r}")
            try:
                stamp = beat.stat().st_mtime_ns  # compared with itself: no clocks compared
            except FileNotFoundError:
                stamp = None
            last, since = self._peers.get(r, (None, now))
            if stamp != last:
                self._peers[r] = (stamp, now)
            elif now - since > timeout:
                raise UserError(
                    f"curate: rank {r} has not been heard from in {timeout:.0f} s (killed, or "
                    "its node lost?); run the same command again to resume"
                )

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        delay, said = 0.02, time.monotonic()
        while not ready():
            if self.world > 1:
                self._check_peers()
            if time.monotonic() - said > 60:
                log.info("curate: rank %d still waiting for %s", self.rank, what)
                said = time.monotonic()
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
        write_atomic(self.path("ends", f"{self.attempt}.{self.rank}"), b"")
        if self.rank == 0:
            ends = [self.path("ends", f"{self.attempt}.{r}") for r in range(1, self.world)]
            self._wait(lambda: all(e.exists() for e in ends), "the other ranks to finish")

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
    """The records of a RecordWriter's file, one pickle each (a fresh unpickler per record: the
    writer's memo restarts at each record, and a shared one would resolve a record's references
    to an earlier record's objects)."""
    with open(path, "rb") as f:
        while True:
            try:
                yield pickle.load(f)
            except EOFError:
                return
