"""Compare the planner's memory estimate with a measured peak (the "within 20%" check).

Use, once `megatron-ext train` runs:
    est = estimate_for_run(cfg, world_size)          # cfg: the run config as a dict
    peak = measured_peak(ckpt_dir / "metrics.jsonl")  # GPU: the trainer's logged peak
    # or on CPU: peak_rss_bytes(train_argv) - peak_rss_bytes(baseline_argv)
    ok, err = within(est.total, peak, tolerance=0.2)
On CPU the peak is the resident-set growth of the training process over a baseline process that
imports the same libraries and exits (torch itself is ~0.3 GB of RSS), so the model has to be
big enough (tens of MB of state) for the difference to mean something.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.planner.memory import Layout, MemoryEstimate, estimate_memory

PEAK_KEYS = ("peak_memory_bytes", "max_memory_allocated", "peak_mem_bytes")


def estimate_for_run(cfg: dict, world_size: int) -> MemoryEstimate:
    """The estimate for a run config (a dict as in RUN.yaml) on `world_size` ranks."""
    from megatron_ext.models.config import resolve_model_config
    from megatron_ext.training.config import DataConfig, ParallelConfig, TrainConfig

    def get(section: str, key: str, default):
        return (cfg.get(section) or {}).get(key, default)

    tp, pp = get("parallel", "tp", ParallelConfig.tp), get("parallel", "pp", ParallelConfig.pp)
    if world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not divisible by tp x pp = {tp} x {pp}")
    seq = get("data", "seq_length", DataConfig.seq_length)
    model = resolve_model_config(cfg.get("model") or {"preset": "tiny"}).replace(seq_length=seq)
    recompute = get("train", "activation_checkpointing", TrainConfig.activation_checkpointing)
    if recompute not in ("none", "full"):
        raise UserError(f"train.activation_checkpointing={recompute}: the estimate knows none/full")
    layout = Layout(
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        micro_batch_size=get("train", "micro_batch_size", TrainConfig.micro_batch_size),
        recompute=recompute,
        sequence_parallel=get("parallel", "sequence_parallel", ParallelConfig.sequence_parallel),
    )
    return estimate_memory(
        model,
        layout,
        seq,
        get("train", "global_batch_size", TrainConfig.global_batch_size),
        get("train", "precision", TrainConfig.precision),
    )


def measured_peak(metrics_path: str | Path) -> int | None:
    """Largest peak-memory value logged in metrics.jsonl (any of PEAK_KEYS), or None."""
    peak = None
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key in PEAK_KEYS:
            if isinstance(rec.get(key), (int, float)):
                peak = max(peak or 0, int(rec[key]))
    return peak


# Runs the command from a small Python process: Linux folds the forking process's peak RSS into
# the child's ru_maxrss, so measuring straight from a big parent (pytest with torch) would report
# the parent's size.
_RSS_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def peak_rss_bytes(argv: list[str], env: dict | None = None) -> int:
    """Peak resident set of a command's process (ru_maxrss; Linux reports KiB)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, *argv], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


def within(estimate: int, measured: int, tolerance: float = 0.2) -> tuple[bool, float]:
    """(|estimate - measured| <= tolerance x measured, relative error)."""
    if measured <= 0:
        raise ValueError("measured peak must be positive")
    err = (estimate - measured) / measured
    return abs(err) <= tolerance, err
