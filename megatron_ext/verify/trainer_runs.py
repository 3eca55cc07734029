"""The real `megatron-ext train` CLI as a subprocess, and S3: a short bf16 run, then bit-exact
resume (an uninterrupted 6-step run against one stopped at step 3 and resumed to 6).

Every leg uses `optim.decay_iters=6`, so the learning-rate schedule of the 3-step leg is the one
of the 6-step runs (it is otherwise derived from train.iterations). The figures compare the
`loss` of steps 4-6 in each run's `checkpoint.dir/metrics.jsonl`; bf16 on one device with the
same data order is expected to repeat exactly (< 1e-6). Should it not, a second uninterrupted
run measures the run-to-run noise, so the record says whether resuming adds anything.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.verify.common import (
    ROOT,
    SectionContext,
    child_env,
    kill_group,
    read_jsonl,
    start,
    write_synthetic_dataset,
)

TINY_BLOOM = ROOT / "examples" / "tiny_bloom.yaml"
QUIET = ("logging.tensorboard=false", "logging.eval_interval=0")
RESUME_TOLERANCE = 1e-6
S3_STEPS, S3_STOP = 6, 3
POLL_S = 0.2


@dataclass
class TrainerRun:
    """One `megatron-ext train` process: returncode 0 also when this helper stopped it once
    the steps asked for were logged; None when it stopped it at the section's deadline."""

    returncode: int | None
    seconds: float
    rows: list[dict]
    log: Path
    timed_out: bool = False

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.rows if "loss" in r and "step" in r}

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.is_file() else ""

    def check(self, what: str) -> None:
        if self.returncode != 0:
            why = "timed out" if self.timed_out else f"exited {self.returncode}"
            raise RuntimeError(f"{what}: the trainer {why}; log {self.log}:\n{self.log_tail()}")


def run_trainer(
    ctx: SectionContext, label: str, ckpt: Path, overrides: list[str], *,
    config: Path | None = None, stop_after_steps: int | None = None, margin_s: float = 3.0,
) -> TrainerRun:  # fmt: skip
    """`python -m megatron_ext train [--config C] checkpoint.dir=CKPT OVERRIDES` on this
    machine's device. With `stop_after_steps` the process is killed (SIGKILL: no final
    checkpoint of a large model) once that many step rows are in its metrics.jsonl."""
    cmd = [sys.executable, "-m", "megatron_ext", "train"]
    cmd += ["--config", str(config)] if config else []
    cmd += [f"checkpoint.dir={ckpt}", *QUIET, *overrides]
    metrics = ckpt / "metrics.jsonl"
    began = time.monotonic()
    proc = start(cmd, ctx.log_path(label), child_env(ctx))
    stopped = timed_out = False
    while proc.poll() is None:
        if ctx.remaining() < margin_s:
            timed_out = True
            break
        if stop_after_steps and _step_rows(metrics) >= stop_after_steps:
            stopped = True
            break
        time.sleep(POLL_S)
    if stopped or timed_out:
        kill_group(proc)
    # stopped on purpose with the steps it was asked for: as good as a clean exit
    code = 0 if stopped else None if timed_out else proc.returncode
    rows = [r for r in read_jsonl(metrics) if "step" in r]
    return TrainerRun(code, time.monotonic() - began, rows, ctx.log_path(label), timed_out)


def _step_rows(metrics: Path) -> int:
    return sum("loss" in r for r in read_jsonl(metrics))


# -- S3 --------------------------------------------------------------------------------------


def section_train_resume(ctx: SectionContext) -> dict:
    """The tiny BLOOM through the CLI in bf16: 3 steps, then resume to 6 against 6 straight."""
    data = write_synthetic_dataset(ctx.data_prefix("s3-tiny"), num_docs=300, mean_len=200)
    base = [f"data.path={data}", "train.precision=bf16", f"optim.decay_iters={S3_STEPS}",
            f"checkpoint.interval={S3_STOP}", "checkpoint.keep=2"]  # fmt: skip
    ckpt, straight = ctx.path("ckpt"), ctx.path("straight")
    for path in (ckpt, straight):
        shutil.rmtree(path, ignore_errors=True)
    first = run_trainer(
        ctx, "first", ckpt, [*base, f"train.iterations={S3_STOP}"], config=TINY_BLOOM
    )
    first.check("S3 first leg (3 steps)")
    figures = {"first_leg_seconds": round(first.seconds, 1), "first_leg_losses": _losses(first),
               "first_leg_finite": all(_finite(v) for v in first.losses.values())}  # fmt: skip
    resumed = run_trainer(ctx, "resumed", ckpt, [*base, f"train.iterations={S3_STEPS}"],
                          config=TINY_BLOOM)  # fmt: skip
    resumed.check("S3 resumed leg (steps 4-6)")
    full = run_trainer(ctx, "straight", straight, [*base, f"train.iterations={S3_STEPS}"],
                       config=TINY_BLOOM)  # fmt: skip
    full.check("S3 uninterrupted 6-step run")
    diff = max_abs_diff(full.losses, resumed.losses, range(S3_STOP + 1, S3_STEPS + 1))
    figures |= {"resumed_from_checkpoint": "loaded checkpoint" in resumed.log_tail(20000),
                "resume_losses": _losses(resumed), "straight_losses": _losses(full),
                "resume_max_abs_diff": diff, "tolerance": RESUME_TOLERANCE}  # fmt: skip
    figures["resume_match"] = diff is not None and diff < RESUME_TOLERANCE
    if not figures["resume_match"]:
        figures |= noise_floor(ctx, base, full)
        figures["status"] = "failed"
    return figures


def noise_floor(ctx: SectionContext, base: list[str], full: TrainerRun) -> dict:
    """A second uninterrupted run against the first: the run-to-run difference (if time)."""
    if ctx.remaining() < full.seconds + 5:
        return {"run_to_run_max_abs_diff": "not measured (no time left)"}
    again_dir = ctx.path("straight-again")
    shutil.rmtree(again_dir, ignore_errors=True)
    again = run_trainer(ctx, "straight-again", again_dir, [*base, f"train.iterations={S3_STEPS}"],
                        config=TINY_BLOOM)  # fmt: skip
    if again.returncode != 0:
        return {"run_to_run_max_abs_diff": f"not measured (trainer exit {again.returncode})"}
    steps = range(S3_STOP + 1, S3_STEPS + 1)
    return {"run_to_run_max_abs_diff": max_abs_diff(full.losses, again.losses, steps)}


def max_abs_diff(a: dict[int, float], b: dict[int, float], steps) -> float | None:
    """Largest |a[s] - b[s]| over `steps`; None when a step is missing or not finite."""
    pairs = [(a.get(s), b.get(s)) for s in steps]
    if any(x is None or y is None or not (_finite(x) and _finite(y)) for x, y in pairs):
        return None
    return max(abs(x - y) for x, y in pairs)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _losses(run: TrainerRun) -> list[float]:
    return [None if v is None else round(v, 6) for _, v in sorted(run.losses.items())]
