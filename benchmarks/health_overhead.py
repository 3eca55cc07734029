"""What the long-run health checks cost per step: the loss-spike guard (train.spikes, one
all-reduce of the loss and grad norm and a window update inside the optimizer step) and the
straggler report (logging.straggler_interval: one flag test per pipeline instruction, every
100th step timed and gathered), on the CPU benchmark of results/train_cpu.md (BLOOM recipe, 4
layers, hidden 128, seq 128, micro-batch 4, global batch 8, fp32, 2 processes, gloo).

    python benchmarks/health_overhead.py [--steps 150] [--repeats 5] [--record FILE]

Baseline: the same run with train.spikes.action=none and logging.straggler_interval=0. The
runs alternate REPEATS times per layout, in ABBA order (baseline first in even pairs). Reported: the median tokens/s of
each (steps after the first 5, from metrics.jsonl), the median of the pairs' ratios, and, from
inside the checked runs, the guard's own time per step (a hook times SpikeGuard.decide on rank
0) as a share of the median step time: a figure the machine's noise does not blur.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import ROOT, finish, finnish_dataset  # noqa: E402
from train_throughput import ours  # noqa: E402

OFF = ("train.spikes.action=none", "logging.straggler_interval=0")
LAYOUTS = {"dp=2": (1, 1), "pp=2": (2, 1)}
OUT_ENV = "HEALTH_OVERHEAD_OUT"


class GuardTimer:
    """A step hook (MEGATRON_EXT_HOOKS=health_overhead:GuardTimer): rank 0 times the spike
    guard's decide() calls and writes each step's total seconds to $HEALTH_OVERHEAD_OUT."""

    def __init__(self, cfg):
        self.seconds: list[float] = []
        self.wrapped = False

    def before_step(self, run) -> None:
        self.seconds.append(0.0)  # this step's total (DeepSpeed steps each parameter group)
        if self.wrapped:
            return
        self.wrapped = True
        guard = run.engine.ds.optimizer.optimizer.guard
        decide = guard.decide

        def timed():
            start = time.perf_counter()
            out = decide()
            self.seconds[-1] += time.perf_counter() - start
            return out

        guard.decide = timed

    def after_step(self, run, row) -> None:
        import torch.distributed as dist

        if dist.get_rank() == 0 and run.step == run.cfg.train.iterations:
            Path(os.environ[OUT_ENV]).write_text(json.dumps(self.seconds))


def checked_run(data: str, steps: int, pp: int, tp: int, out: Path) -> float:
    hooks = {"MEGATRON_EXT_HOOKS": "health_overhead:GuardTimer", OUT_ENV: str(out)}
    saved = {k: os.environ.get(k) for k in [*hooks, "PYTHONPATH"]}
    os.environ.update(hooks, PYTHONPATH=f"{HERE}{os.pathsep}{ROOT}")
    try:
        return ours(data, steps, pp, tp)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--record", default=None)
    args = p.parse_args(argv)
    lines = [
        "| layout | baseline tokens/s | checked tokens/s | checked / baseline (median of pairs) "
        "| guard time per step | its share of a step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as work:
        data = finnish_dataset(Path(work))
        for layout, (pp, tp) in LAYOUTS.items():
            base, checked, guard = [], [], []
            for i in range(args.repeats):  # ABBA: a drift of the machine cancels out
                out = Path(work) / f"guard-{layout}-{i}.json"
                for which in ("base", "checked") if i % 2 == 0 else ("checked", "base"):
                    if which == "base":
                        base.append(ours(data, args.steps, pp, tp, extra=OFF))
                    else:
                        checked.append(checked_run(data, args.steps, pp, tp, out))
                guard += json.loads(out.read_text())[5:]
            b, c = statistics.median(base), statistics.median(checked)
            ratio = statistics.median(x / y for x, y in zip(checked, base, strict=True))
            per_step = statistics.median(guard)
            step_s = 8 * 128 / c  # global batch x seq / tokens per second
            lines.append(
                f"| {layout} | {b:,.0f} | {c:,.0f} | {ratio:.3f} | {per_step * 1e3:.3f} ms "
                f"| {per_step / step_s:.2%} |"
            )
    finish(lines, "health_overhead.py", args.record, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
