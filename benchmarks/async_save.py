#!/usr/bin/env python3
"""Training stall per checkpoint save: synchronous (the baseline) against checkpoint.async_save.

    python benchmarks/async_save.py
    python benchmarks/async_save.py --record benchmarks/results/async_save.md

One rank trains a BLOOM of --layers x --hidden (fp32, ZeRO-1: weights, fp32 master and two Adam
moments, ~16 bytes per parameter, >= 1 GB by default) for --iterations steps with a save every
--interval steps, once with synchronous saves and once with asynchronous ones. The stall is
what the trainer logs per save ("training stalled X s for the save of iter_N": from the call
to the return to training, all waiting included); the saves inside the run are compared (the
last one of an asynchronous run also waits for its write at the end, and is reported apart).
Also reported: the mean tokens/s of the steps that ran while a background write was going
on, against the synchronous run's, and the checkpoint size. Files are fsynced in both modes.

For reference, torch's own asynchronous distributed checkpointing (torch.distributed.checkpoint
.async_save, one process, gloo) is timed on a state dict of the same size: the time until it
returns (its stall) and until its write is done.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import finish, finnish_dataset  # noqa: E402

STALL = re.compile(r"training stalled ([0-9.]+) s for the save of iter_(\d+)")
LAST_WAIT = re.compile(r"waited ([0-9.]+) s for the last background write")


def run(base: list[str], ckpt: Path, extra: list[str]) -> tuple[dict[int, float], dict, int]:
    """Stall per saved step, the metrics rows by step, and the last checkpoint's bytes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([*base, f"checkpoint.dir={ckpt}", *extra], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    stalls = {int(m.group(2)): float(m.group(1)) for m in STALL.finditer(proc.stderr)}
    last_wait = LAST_WAIT.search(proc.stderr)
    stalls[-1] = float(last_wait.group(1)) if last_wait else 0.0
    rows = {}
    for line in (ckpt / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    latest = ckpt / (ckpt / "latest").read_text().strip()
    size = sum(p.stat().st_size for p in latest.iterdir() if p.is_file())
    return stalls, rows, size


def torch_dcp(nbytes: int, work: Path) -> tuple[float, float]:
    """torch.distributed.checkpoint.async_save of NBYTES of fp32 tensors: (return s, done s)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from megatron_ext.training.ranks import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1")  # fmt: skip
    dist.init_process_group("gloo")
    n = nbytes // 4 // 16
    state = {f"t{i}": torch.randn(n) for i in range(16)}
    t0 = time.perf_counter()
    future = dcp.async_save(state, checkpoint_id=str(work / "dcp"))
    returned = time.perf_counter() - t0
    future.result()
    done = time.perf_counter() - t0
    dist.destroy_process_group()
    return returned, done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--iterations", type=int, default=9)
    p.add_argument("--interval", type=int, default=3)
    p.add_argument("--work-dir", default="/tmp/megatron-ext-bench-async")
    p.add_argument("--record", help="append the results to this markdown file")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = finnish_dataset(work)
    base = [sys.executable, "-m", "megatron_ext", "train", "--config",
            str(ROOT / "examples" / "tiny_bloom.yaml"), f"data.path={data}",
            "logging.tensorboard=false", "logging.eval_interval=0", "checkpoint.keep=1",
            f"model.num_layers={args.layers}", f"model.hidden_size={args.hidden}",
            "model.num_attention_heads=12", f"train.iterations={args.iterations}",
            f"checkpoint.interval={args.interval}"]  # fmt: skip
    sync = run(base, work / "sync", [])
    shutil.rmtree(work / "sync", ignore_errors=True)
    asyn = run(base, work / "async", ["checkpoint.async_save=true"])
    shutil.rmtree(work / "async", ignore_errors=True)
    seq = 64  # examples/tiny_bloom.yaml
    inside = [s for s in range(args.interval, args.iterations, args.interval)]
    sync_stall = statistics.mean(sync[0][s] for s in inside)
    async_stall = statistics.mean(asyn[0][s] for s in inside)
    during = [s + 1 for s in inside]  # the step right after a save runs beside its write
    others = [s for s in sync[1] if s not in during and s > 1]

    def step_s(rows, steps):
        return statistics.mean(rows[s]["tokens_per_s"] for s in steps)

    def total_s(result):  # steps 2..N and every save's stall (the first step builds things)
        rows, stalls = result[1], result[0]
        steps = sum(
            r["global_batch_size"] * seq / r["tokens_per_s"] for s, r in rows.items() if s > 1
        )
        return steps + sum(stalls.values())

    def stall_list(stalls):
        return ", ".join(f"{stalls[s]:.3f}" for s in inside)

    def last(stalls):
        return stalls[args.iterations] + stalls[-1]

    dcp_return, dcp_done = torch_dcp(sync[2], work)
    lines = [
        f"checkpoint save stall, {platform.node()} ({os.cpu_count()} CPUs), one rank, BLOOM "
        f"{args.layers} layers x hidden {args.hidden} (fp32, ZeRO-1), checkpoint "
        f"{sync[2] / 1e9:.2f} GB, saves at steps {inside} (+ the last, step {args.iterations})",
        "",
        "| saves | stall of each save in the run, s | the last save + the wait for its write, s |",
        "|---|---|---|",
        f"| synchronous (baseline) | {stall_list(sync[0])} | {last(sync[0]):.3f} |",
        f"| checkpoint.async_save | {stall_list(asyn[0])} | {last(asyn[0]):.3f} |",
        "",
        f"stall ratio synchronous / asynchronous, mean of the saves in the run: "
        f"{sync_stall / async_stall:.1f}x; the first save allocates the host buffers, later "
        f"ones reuse them: {sync[0][inside[-1]] / asyn[0][inside[-1]]:.1f}x at step {inside[-1]}",
        f"steps 2-{args.iterations} plus every save's stall and the final wait: "
        f"{total_s(sync):.1f} s synchronous, {total_s(asyn):.1f} s asynchronous",
        f"tokens/s of the step right after a save (beside the background write): "
        f"{step_s(asyn[1], during):.0f} (async run) vs {step_s(sync[1], during):.0f} "
        f"(sync run); other steps {step_s(asyn[1], others):.0f} vs "
        f"{step_s(sync[1], others):.0f}",
        f"torch.distributed.checkpoint.async_save of {sync[2] / 1e9:.2f} GB (16 fp32 tensors): "
        f"returns after {dcp_return:.3f} s, written after {dcp_done:.3f} s",
    ]
    finish(lines, "async_save.py", args.record, argv)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
