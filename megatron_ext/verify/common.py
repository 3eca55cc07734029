"""What every verification section shares: its context (output dir, dry run, deadline, partial
records), subprocesses bounded by the section's deadline, and the synthetic dataset writer.

A section is a function `fn(ctx: SectionContext) -> dict` of figures, run in its own process
(`python -m megatron_ext.verify --section SN`); see `megatron_ext.verify.runner`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository (setup.py, tests/, examples/)
TAIL_CHARS = 3000

# Dense bf16 peak per device (TFLOP/s, datasheet) for the MFU figures, by a substring of the
# device name; an unknown device gets no MFU.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "MI250X": 383.0}


def peak_tflops(device_name: str | None) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if device_name and key in device_name:
            return value
    return None


@dataclass
class SectionContext:
    """One section's run: where it writes, whether it is the CPU dry run, when it must end."""

    name: str
    out: Path  # results, logs, junit XML: what a person reads afterwards
    dry_run: bool
    deadline: float  # time.monotonic() by which the section's own work must be done
    work: Path | None = None  # datasets and checkpoints (default: out/work)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.work = self.work or self.out / "work"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def path(self, name: str) -> Path:
        """A working dir of this section (`s3-ckpt`, ...) under the work dir."""
        return self.work / f"{self.name.lower()}-{name}"

    def data_prefix(self, name: str) -> Path:
        """A synthetic dataset's prefix, shared by the sections of one run."""
        return self.work / "data" / name

    def log_path(self, label: str) -> Path:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        return logs / f"{self.name}-{label}.log"

    @property
    def partial_path(self) -> Path:
        return self.out / "sections" / f"{self.name}.partial.jsonl"

    def partial(self, record: dict) -> None:
        """Keep one finished piece of this section (flushed now): a timeout still reports it."""
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        with self.partial_path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def device(self) -> torch.device:
        import torch

        if self.dry_run or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda")


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text[-n:]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file that may still be written (a partial last line is skipped)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def repo_env(dry_run: bool, **extra: str) -> dict[str, str]:
    """The environment for a subprocess: this repository first on PYTHONPATH (after it any
    `.site` dir the caller set for DeepSpeed); one OpenMP thread in the dry run (tiny shapes on
    shared cores run many times slower with a spinning thread per core)."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    if dry_run:
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def child_env(ctx: SectionContext, **extra: str) -> dict[str, str]:
    return repo_env(ctx.dry_run, **extra)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this helper started `proc` in (its own, see `start`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start(cmd: list[str], log: Path, env: dict, cwd: Path = ROOT) -> subprocess.Popen:
    """Start `cmd` in a process group of its own (so a timeout ends its children too), its
    output to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp
        )


@dataclass
class Finished:
    """A subprocess's end: returncode None when it was stopped at the deadline."""

    returncode: int | None
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def log_tail(self, n: int = TAIL_CHARS) -> str:
        return tail(self.log.read_text(errors="replace"), n) if self.log.is_file() else ""


def run_logged(
    ctx: SectionContext, cmd: list[str], label: str, *, env: dict | None = None,
    margin_s: float = 2.0, cwd: Path = ROOT,
) -> Finished:  # fmt: skip
    """Run `cmd` to its end or until the section's deadline (less `margin_s`), output to
    logs/<section>-<label>.log."""
    log = ctx.log_path(label)
    began = time.monotonic()
    proc = start(cmd, log, env or child_env(ctx), cwd)
    try:
        code = proc.wait(timeout=max(1.0, ctx.remaining() - margin_s))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        code = None
    return Finished(code, time.monotonic() - began, log)


def python_json(ctx: SectionContext, code: str, label: str) -> dict:
    """Run `code` in a fresh interpreter (from the repository root) that prints one JSON object
    last; {"error": ...} when it fails."""
    done = run_logged(ctx, [sys.executable, "-c", code], label)
    text = done.log.read_text(errors="replace") if done.log.is_file() else ""
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"error": f"exit {done.returncode}: {tail(text, 1500)}"}


def write_synthetic_dataset(
    prefix: Path, num_docs: int, mean_len: int, vocab_size: int = 1000, seed: int = 0
) -> Path:
    """An MMIDIDX dataset of random token ids in [1, vocab_size) (0 ends each document),
    written with the repository's own writer; kept when it is already there."""
    from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder, index_file_path

    if Path(index_file_path(prefix)).is_file():
        return prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(mean_len // 2, mean_len * 3 // 2 + 1, num_docs)
    docs = [rng.integers(1, vocab_size, n, dtype=np.int64).tolist() for n in lengths]
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        builder.add_documents(docs, eod=0)
        builder.finalize()
    return prefix


def median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
