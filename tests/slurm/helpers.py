"""Helpers of the slurm tier: job tracking, the stand-in trainer, reading a run's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "slurm" / "local" / "cluster.sh"
FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
MPI_TRAINER = Path(__file__).with_name("mpi_trainer.py")
DEFAULT_TIMEOUT_S = 120


def hard_timeout(seconds: int):
    """Decorator: the test fails (and its jobs are cancelled) after this many seconds."""

    def mark(fn):
        fn._hard_timeout_s = seconds
        return fn

    return mark


class Jobs:
    """Job ids a test submitted; all are cancelled when the test ends."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def add(self, *ids: str) -> None:
        self.ids.extend(ids)

    def active(self, ids=None) -> list[str]:
        """Ids (array ids included) still pending or running."""
        ids = set(ids or self.ids)
        out = subprocess.run(
            ["squeue", "-h", "-a", "-o", "%A %F %T"], capture_output=True, text=True, timeout=30
        ).stdout
        alive = []
        for line in out.splitlines():
            job_id, array_id, state = line.split()
            if job_id in ids or array_id in ids:
                alive.append(f"{job_id}:{state}")
        return alive

    def wait(self, ids=None, timeout: float = 120, poll: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while self.active(ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs still queued after {timeout} s: {self.active(ids)}")
            time.sleep(poll)

    def cancel(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True, timeout=30)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None):
    """`megatron-ext ARGS` (a job it submits inherits ENV, as sbatch exports it by default)."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_ext", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


def fake_train_cmd() -> str:
    return f"{sys.executable} {FAKE_TRAINER} --config {{config}}"


def write_run_config(
    path: Path,
    iterations: int,
    step_seconds: float = 0.0,
    interval: int = 1000,
    hold_at: int | None = None,
    fake: bool = True,  # False: only keys `megatron-ext train` knows
):
    cfg = {
        "model": {"preset": "tiny"},
        "parallel": {"tp": 1, "pp": 1},
        "data": {"path": "unused", "seq_length": 8},
        "train": {"iterations": iterations, "micro_batch_size": 1, "global_batch_size": 2},
        "optim": {"lr": 0.05},
        "checkpoint": {"dir": str(path.parent / "ckpt"), "interval": interval},
    }
    if fake:
        cfg["fake"] = {"step_seconds": step_seconds, "hold_at_step": hold_at}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def submit(run_dir: Path, config: Path, *extra: str) -> list[str]:
    """`megatron-ext slurm submit` with the local profile on 2 nodes; returns the new job ids."""
    record = run_dir / "jobs.jsonl"
    before = len(record.read_text().splitlines()) if record.exists() else 0
    proc = run_cli(
        "slurm", "submit", "--profile", "local", "--nodes", "2", "--config", str(config),
        "--train-cmd", fake_train_cmd(), "-o", str(run_dir / "job.sbatch"), *extra,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line)["job_id"] for line in record.read_text().splitlines()[before:]]


def metrics(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "logs").glob("*.out")))


def reference_loss(config: Path, tmp: Path, world_size: int = 2) -> float:
    """Final loss of an uninterrupted run of the fake trainer: local processes, no Slurm."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = tmp / "reference_ckpt"
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        argv = [sys.executable, str(FAKE_TRAINER), "--config", str(config)]
        argv += [f"checkpoint.dir={ckpt}", "fake.step_seconds=0", "fake.hold_at_step=null"]
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    try:
        for p in procs:
            out, _ = p.communicate(timeout=90)
            assert p.returncode == 0, out.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return metrics(ckpt)[-1]["loss"]
