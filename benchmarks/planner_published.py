#!/usr/bin/env python3
"""The planner's throughput model against published runs: predicted vs published TFLOPs per
device (hardware FLOPs, recompute counted, as the sources report), the error per row, and the
model's time shares. No processes: the model is a formula over megatron_ext/planner/devices.py
and the constants of megatron_ext/planner/throughput.py.

    python benchmarks/planner_published.py
    python benchmarks/planner_published.py --record benchmarks/results/planner.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import finish  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", help="append the table to this markdown file")
    args = p.parse_args(argv)
    from megatron_ext.planner.published import RUNS, predicted

    lines = [
        "Throughput model vs published runs (TFLOPs per device counting recompute)",
        "",
        "| run | tp,pp,dp,mbs | GBS | device | published | predicted | error | step s "
        "| largest time shares |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in RUNS:
        pred = predicted(run)
        shares = sorted(pred.shares.items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in shares)
        err = pred.tflops_per_device_hardware / run.tflops - 1
        lines.append(
            f"| {run.name} | {','.join(map(str, run.layout))} | {run.global_batch} | "
            f"{run.device} | {run.tflops:g} | {pred.tflops_per_device_hardware:.1f} | "
            f"{err:+.1%} | {pred.step_time_s:.1f} | {top} |"
        )
    lines += ["", "Sources:"] + sorted({f"- {r.source}" for r in RUNS})
    finish(lines, "planner_published.py", args.record, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
