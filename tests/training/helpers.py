"""Run `megatron-ext train` / `evaluate` as a subprocess, read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "bloom": ROOT / "examples" / "tiny_bloom.yaml",
    "llama": ROOT / "examples" / "tiny_llama.yaml",
}
QUIET = ["logging.tensorboard=false", "logging.eval_interval=0"]


def train_cmd(family: str, data: str, ckpt, *overrides: str, nproc: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_ext", "train", "--config", str(TINY[family])]
    cmd += [f"data.path={data}", f"checkpoint.dir={ckpt}", *QUIET, *overrides]
    return cmd + (["--nproc-per-node", str(nproc)] if nproc else [])


def env(faults: dict | None = None) -> dict:
    """The environment of a run; `faults` injects them through a step hook (faults.py)."""
    from tests.training.faults import env_vars

    extra = env_vars(faults) if faults else {}
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def run_train(family, data, ckpt, *overrides, nproc=None, timeout=300, check=True, faults=None):
    proc = subprocess.run(
        train_cmd(family, data, ckpt, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(faults),
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(ckpt) -> list[dict]:
    path = Path(ckpt) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(ckpt) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(ckpt)}


def logged_steps(ckpt) -> list[int]:
    """Steps in metrics.jsonl so far, read while the trainer may be writing (a partial last
    line is skipped; no file yet: none)."""
    path = Path(ckpt) / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            pass
    return steps
