#!/usr/bin/env python3
"""Universal-checkpoint conversion (the offline step of a layout change): throughput with
--workers N against one worker, on the same checkpoint.

    python benchmarks/universal_workers.py                        # ~0.4 GB checkpoint
    python benchmarks/universal_workers.py --record benchmarks/results/universal_workers.md

A BLOOM-architecture model (--layers, --hidden; vocabulary 1000) trains one step at
pp=2, tp=2, dp=1 (4 local ranks, fp32) to make a checkpoint with optimizer state (4 ZeRO shard
files: the extract phase's work items; one merge item per parameter). Then
`to_universal.convert` runs on separate copies of it with 1 worker (the baseline: what the
trainer did on rank 0) and with --workers, each timed in this process after a warm-up
conversion (imports, page cache), best of --repeats. Torch uses one thread per worker.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_record, finnish_dataset  # noqa: E402


def _train(work: Path, data: str, layers: int, hidden: int) -> Path:
    ckpt = work / "source"
    cmd = [sys.executable, "-m", "megatron_ext", "train", "--config",
           str(ROOT / "examples" / "tiny_bloom.yaml"), f"data.path={data}",
           f"checkpoint.dir={ckpt}", "logging.tensorboard=false", "logging.eval_interval=0",
           f"model.num_layers={layers}", f"model.hidden_size={hidden}",
           "model.num_attention_heads=8", "parallel.pp=2", "parallel.tp=2",
           "train.iterations=1", "checkpoint.interval=1", "--nproc-per-node", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/megatron-ext-bench-universal")
    p.add_argument("--record", help="append the results to this markdown file")
    args = p.parse_args(argv)

    import torch

    from megatron_ext.convert import to_universal

    torch.set_num_threads(1)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    source = _train(work, finnish_dataset(work), args.layers, args.hidden)
    tag = (source / "latest").read_text().strip()
    size = sum(f.stat().st_size for f in (source / tag).iterdir())

    def run(workers: int) -> float:
        copy = work / f"copy{workers}"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        os.symlink(source / tag, copy / tag)
        t0 = time.perf_counter()
        to_universal.convert(copy, tag, workers, checked=True)
        return time.perf_counter() - t0

    run(1)  # warm-up
    times = {n: min(run(n) for _ in range(args.repeats)) for n in (1, args.workers)}
    gb = size / 1e9
    lines = [
        f"universal conversion of a {gb:.2f} GB checkpoint ({args.layers} layers, hidden "
        f"{args.hidden}, pp=2 tp=2 dp=1, fp32), best of {args.repeats}, {platform.node()} "
        f"({os.cpu_count()} CPUs), torch {torch.__version__}",
        "| workers | s | GB/s | vs 1 worker |",
        "|---|---|---|---|",
    ]
    for n, t in times.items():
        lines.append(f"| {n} | {t:.2f} | {gb / t:.3f} | {times[1] / t:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.record:
        append_record(
            args.record, "universal_workers.py", sys.argv[1:] if argv is None else argv, text
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
