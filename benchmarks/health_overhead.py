"""What the long-run health checks cost per step: the loss-spike guard (train.spikes, an
all-reduce of the loss and a window update inside the optimizer step) and the straggler report
(logging.straggler_interval: one flag test per pipeline instruction, every N-th step timed and
gathered), on the CPU benchmark of results/train_cpu.md (BLOOM recipe, 4 layers, hidden 128,
seq 128, micro-batch 4, global batch 8, fp32, 2 processes, gloo).

    python benchmarks/health_overhead.py [--steps 40] [--repeats 3] [--record FILE]

Baseline: the same runs with train.spikes.action=none and logging.straggler_interval=0. Runs
alternate (baseline, checked) REPEATS times per layout; reported: median tokens/s of each (the
steps after the first 5, from metrics.jsonl), and checked / baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import finish, finnish_dataset  # noqa: E402
from train_throughput import ours  # noqa: E402

OFF = ("train.spikes.action=none", "logging.straggler_interval=0")
# the defaults (spike guard on; straggler report every 100 steps) and a report every 10 steps
CHECKED = {"defaults": (), "straggler report every 10 steps": ("logging.straggler_interval=10",)}
LAYOUTS = {"dp=2": (1, 1), "pp=2": (2, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--record", default=None)
    args = p.parse_args(argv)
    lines = ["| layout | checks | baseline tokens/s | checked tokens/s | checked / baseline |"]
    lines.append("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as work:
        data = finnish_dataset(Path(work))
        for layout, (pp, tp) in LAYOUTS.items():
            for name, extra in CHECKED.items():
                base, checked = [], []
                for _ in range(args.repeats):
                    base.append(ours(data, args.steps, pp, tp, extra=OFF))
                    checked.append(ours(data, args.steps, pp, tp, extra=extra))
                b, c = statistics.median(base), statistics.median(checked)
                lines.append(f"| {layout} | {name} | {b:,.0f} | {c:,.0f} | {c / b:.3f} |")
    finish(lines, "health_overhead.py", args.record, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
