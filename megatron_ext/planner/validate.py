"""Compare the planner's memory estimate with a measured peak (the "within 20%" check).

On CPU, `measure_run` runs the real `megatron-ext train` for a few steps and reads rank 0's
`peak_rss_mb - baseline_rss_mb` from metrics.jsonl: the resident-set peak since just before the
model was built. glibc is given a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_) so tensors freed
during a step go back to the OS and the resident set follows the live tensors, as
`torch.cuda.max_memory_allocated` does on GPUs; with the default (dynamic) threshold glibc keeps
freed blocks of up to 32 MiB in its heap and the peak is 60-80% higher (recorded beside it in
benchmarks/results/planner.md). The estimate is the one of rank 0's pipeline stage.

    python -m megatron_ext.planner.validate --config examples/tiny_bloom.yaml \
        --data-path PREFIX --work-dir DIR [--nproc-per-node N] [KEY=VALUE ...]

prints one table row: shape, estimate, measured, error. On GPUs `measured_peak` reads the
trainer's logged peak instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.planner.memory import (
    CPU_RUNTIME_BYTES,
    Layout,
    MemoryEstimate,
    estimate_memory,
    estimate_stages,
)

PEAK_KEYS = ("peak_memory_bytes", "max_memory_allocated", "peak_mem_bytes")


def estimate_for_run(
    cfg: dict, world_size: int, stage: int | None = None, runtime_bytes: int = 0
) -> MemoryEstimate:
    """The estimate for a run config (a dict as in RUN.yaml) on `world_size` ranks: of pipeline
    stage `stage`, or of the most loaded one. The dict is read as the trainer reads it
    (RunConfig: its defaults, the model resolved, unknown keys refused)."""
    import copy

    from megatron_ext.config import from_dict
    from megatron_ext.training.config import RunConfig

    run = from_dict(RunConfig, copy.deepcopy(cfg), where="run config")
    tp, pp = run.parallel.tp, run.parallel.pp
    if world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not divisible by tp x pp = {tp} x {pp}")
    recompute = run.train.activation_checkpointing
    if recompute not in ("none", "selective", "full"):
        raise UserError(
            f"train.activation_checkpointing={recompute}: the estimate knows none/selective/full"
        )
    layout = Layout(
        tp=tp,
        pp=pp,
        dp=world_size // (tp * pp),
        micro_batch_size=run.train.micro_batch_size,
        recompute=recompute,
        sequence_parallel=run.parallel.sequence_parallel,
    )
    args = (
        run.model,
        layout,
        run.data.seq_length,
        run.train.global_batch_size,
        run.train.precision,
        True,
        runtime_bytes,
    )
    return estimate_memory(*args) if stage is None else estimate_stages(*args)[stage]


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


# glibc: a fixed threshold (which also turns off its dynamic raising) sends every block above it
# to mmap, so freeing a tensor returns its pages; 128 KiB is glibc's own starting value.
FIXED_MMAP_THRESHOLD = "131072"


@dataclass
class Measurement:
    estimate: int  # bytes, rank 0's pipeline stage
    measured: int  # bytes, rank 0's peak resident set growth over the baseline
    error: float  # (estimate - measured) / measured
    baseline: int  # bytes, resident set before the model was built
    breakdown: MemoryEstimate
    step_measured_s: float | None = None  # mean step time after the first step
    step_predicted_s: float | None = None  # planner/throughput.py with the measured CPU device

    @property
    def step_error(self) -> float | None:
        if self.step_measured_s is None or self.step_predicted_s is None:
            return None
        return self.step_predicted_s / self.step_measured_s - 1


def measured_step_s(metrics_path: str | Path, seq_length: int) -> float:
    """Mean step time of the steps after the first (tokens per step / tokens_per_s)."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    steps = [r["global_batch_size"] * seq_length / r["tokens_per_s"] for r in rows
             if r["step"] > 1 and r.get("tokens_per_s")]  # fmt: skip
    if not steps:
        raise UserError(f"{metrics_path}: no step after the first to time; run >= 2 steps")
    return sum(steps) / len(steps)


def predict_for_run(cfg: dict, world_size: int, device, links) -> float:
    """The throughput model's step time for a run config (a dict as in RUN.yaml)."""
    import copy

    from megatron_ext.config import from_dict
    from megatron_ext.planner.throughput import predict
    from megatron_ext.training.config import RunConfig

    run = from_dict(RunConfig, copy.deepcopy(cfg), where="run config")
    tp, pp = run.parallel.tp, run.parallel.pp
    layout = Layout(tp, pp, world_size // (tp * pp), run.train.micro_batch_size,
                    run.train.activation_checkpointing, run.parallel.sequence_parallel)  # fmt: skip
    return predict(run.model, layout, run.data.seq_length, run.train.global_batch_size, device,
                   links, world_size, precision=run.train.precision).step_time_s  # fmt: skip


def rss_growth(metrics_path: str | Path) -> tuple[int, int]:
    """(peak - baseline, baseline) in bytes from the `peak_rss_mb`/`baseline_rss_mb` rows."""
    rows = [json.loads(x) for x in Path(metrics_path).read_text().splitlines() if x.strip()]
    peaks = [r["peak_rss_mb"] for r in rows if r.get("peak_rss_mb") is not None]
    base = [r["baseline_rss_mb"] for r in rows if r.get("baseline_rss_mb") is not None]
    if not peaks or not base:
        raise UserError(f"{metrics_path}: no peak_rss_mb/baseline_rss_mb rows (Linux only)")
    return int((max(peaks) - base[0]) * 2**20), int(base[0] * 2**20)


def measure_run(
    config: str | Path,
    data_path: str,
    work_dir: str | Path,
    overrides: list[str],
    nproc: int = 1,
    fixed_mmap_threshold: bool = True,
    timeout: float = 600,
    cpu: tuple | None = None,
) -> Measurement:
    """Train a few steps with `megatron-ext train` (fresh `work_dir`) and compare rank 0's
    measured peak with the estimate of its stage (from the run's saved, resolved config)."""
    from megatron_ext.config import read_yaml

    ckpt = Path(work_dir)
    if (ckpt / "latest").exists():
        raise UserError(f"{ckpt} holds a checkpoint: measure in a fresh directory")
    argv = [sys.executable, "-m", "megatron_ext", "train", "--config", str(config),
            f"data.path={data_path}", f"checkpoint.dir={ckpt}", "logging.tensorboard=false",
            "logging.eval_interval=0", "checkpoint.interval=100000", *overrides,
            "--nproc-per-node", str(nproc)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if fixed_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = FIXED_MMAP_THRESHOLD
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    measured, baseline = rss_growth(ckpt / "metrics.jsonl")
    tag = (ckpt / "latest").read_text().strip()
    cfg = read_yaml(ckpt / tag / "config.yaml")
    est = estimate_for_run(cfg, nproc, stage=0, runtime_bytes=CPU_RUNTIME_BYTES)  # rank 0: stage 0
    _, err = within(est.total, measured)
    out = Measurement(est.total, measured, err, baseline, est)
    if cpu is not None:  # (Device, Links) of planner/cpu_device.measure
        out.step_measured_s = measured_step_s(ckpt / "metrics.jsonl", cfg["data"]["seq_length"])
        out.step_predicted_s = predict_for_run(cfg, nproc, *cpu)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--data-path", required=True)
    p.add_argument("--work-dir", required=True, help="fresh checkpoint dir of the run")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's dynamic threshold")
    p.add_argument("--step-time", action="store_true",
                   help="also predict the step time (CPU micro-benchmark) against the measured")  # fmt: skip
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    a = p.parse_args(argv)
    cpu = None
    if a.step_time:
        from megatron_ext.planner import cpu_device

        cpu = cpu_device.measure(ranks=a.nproc_per_node)
        print(f"CPU device: {cpu[0]}; links: {cpu[1]}", file=sys.stderr)
    m = measure_run(a.config, a.data_path, a.work_dir, a.overrides, a.nproc_per_node,
                    fixed_mmap_threshold=not a.default_malloc, cpu=cpu)  # fmt: skip
    mib = 2**20
    step = ""
    if cpu is not None:
        step = f" {m.step_predicted_s:.3f} | {m.step_measured_s:.3f} | {m.step_error:+.1%} |"
    print(f"| {' '.join(a.overrides)} | {a.nproc_per_node} | {m.estimate / mib:.0f} | "
          f"{m.measured / mib:.0f} | {m.error:+.1%} | {m.baseline / mib:.0f} |{step}")  # fmt: skip
    g = {k: round(v * 1024, 1) for k, v in m.breakdown.as_gib().items()}
    print(f"estimate (MiB): {g}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
