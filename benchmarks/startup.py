#!/usr/bin/env python3
"""Start-up cost of building a pipeline stage: initialised weights against meta builds.

    python benchmarks/startup.py
    python benchmarks/startup.py --record benchmarks/results/startup.md

A. DeepSpeed's partition_method="parameters" counts each layer's parameters by building it:
   every layer of the whole model, on every rank. Timed here in one process for --count-preset
   (tp=1): building every layer initialised (DeepSpeed's own count, what every rank did before)
   against building it on the meta device (our StagePipeline's count), best of 2.
B. A resume of a model 10x the tiny preset (4 layers, hidden 176: 1.66M parameters) at tp=2
   (2 local ranks, fp32): `train` from its checkpoint for one more step, the stage initialised
   (the baseline; `checkpoint.start_over=true` keeps that path while the checkpoint still
   loads) against built on meta and allocated uninitialised (the default for a resume); wall
   time of the command and the peak resident set of the largest rank (ru_maxrss).
C. A fresh start at tp=2 (nothing to load, one step) of the 10x-tiny model and of a model with
   BLOOM's vocabulary (its embedding is the largest weight: 1 GB in fp32): every full weight
   initialised on each rank and sliced (MEGATRON_EXT_FULL_INIT=1, the cost before issue 17.6)
   against each rank generating only its own shard (the default).
D. The largest single weight a rank initialises, alone: one tp=4 shard of BLOOM-7B1's
   embedding (250,880 x 4096, 4.1 GB in fp32), full init then slice against shard only.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import finish, finnish_dataset  # noqa: E402

MODEL = ["model.num_layers=4", "model.hidden_size=176", "model.num_attention_heads=4"]
VOCAB_MODEL = ["model.num_layers=2", "model.hidden_size=1024", "model.num_attention_heads=16",
               "model.vocab_size=250880"]  # fmt: skip


def count_seconds(preset: str) -> tuple[float, float, int]:
    import torch

    from megatron_ext.models.presets import resolve_model_config
    from megatron_ext.parallel.context import ParallelContext
    from megatron_ext.training.pipeline import layer_specs

    config = resolve_model_config(preset)
    ctx = ParallelContext.single()

    def count(device):
        specs = layer_specs(config, ctx, 1234, device=device)
        t0 = time.perf_counter()
        n = sum(sum(p.numel() for p in s.build().parameters()) for s in specs)
        return time.perf_counter() - t0, n

    torch.set_num_threads(os.cpu_count() or 1)
    real = min(count(None)[0] for _ in range(2))
    meta, n = min(count("meta") for _ in range(2))
    return real, meta, n


def timed(cmd: list[str], extra_env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and the peak RSS (MB) of the largest process of `cmd`, in a fresh wrapper."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, env=env,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return float(out[0]), int(out[1]) / 1024


EMBEDDING = """
import resource, sys, time, torch
from megatron_ext.parallel.tensor_parallel.layers import TiledNormal, make_param
rows, cols, tp = 250880, 4096, 4
torch.manual_seed(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
p = make_param((rows, cols), TiledNormal(0.02, real_rows=250680), slice(0, rows // tp), 0)
seconds = time.perf_counter() - t0
print(seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def embedding_shard(full_init: bool) -> tuple[float, float]:
    """Seconds and RSS growth (MB) to make one TP rank's shard (tp=4) of BLOOM-7B1's 250,880 x
    4096 embedding (4.1 GB in fp32), in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "MEGATRON_EXT_FULL_INIT": "1" if full_init else "0"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", EMBEDDING], env=env, check=True,
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return float(out[0]), float(out[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count-preset", default="bloom-560m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default="/tmp/megatron-ext-bench-startup")
    p.add_argument("--record", help="append the results to this markdown file")
    args = p.parse_args(argv)
    real, meta, n = count_seconds(args.count_preset)
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = finnish_dataset(work)
    base = [sys.executable, "-m", "megatron_ext", "train", "--config",
            str(ROOT / "examples" / "tiny_bloom.yaml"), f"data.path={data}",
            "logging.tensorboard=false", "logging.eval_interval=0", "parallel.tp=2",
            "checkpoint.interval=1", "checkpoint.keep=0", *MODEL]  # fmt: skip
    ranks = ["--nproc-per-node", "2"]
    ckpt = work / "ckpt"
    subprocess.run([*base, f"checkpoint.dir={ckpt}", "train.iterations=1", *ranks], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    results = {}
    for name, extra in (("initialised", ["checkpoint.start_over=true"]), ("meta", [])):
        runs = []
        for _ in range(args.repeats):
            copy = work / f"run-{name}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ckpt, copy)
            cmd = [*base, f"checkpoint.dir={copy}", "train.iterations=2", *extra, *ranks]
            runs.append(timed(cmd))
        results[name] = (min(r[0] for r in runs), min(r[1] for r in runs))
    # C. a fresh start (nothing to load): every full weight initialised then sliced (before
    # issue 17.6) against each rank generating only its shard
    fresh = {}
    for label, model in (("10x tiny", MODEL), ("BLOOM vocabulary", VOCAB_MODEL)):
        for name, extra_env in (("full init, sliced", {"MEGATRON_EXT_FULL_INIT": "1"}),
                                ("own shard only", {})):  # fmt: skip
            runs = []
            for _ in range(args.repeats):
                copy = work / "fresh"
                shutil.rmtree(copy, ignore_errors=True)
                cmd = [*base, *model, f"checkpoint.dir={copy}", "train.iterations=1", *ranks]
                runs.append(timed(cmd, extra_env))
            fresh[(label, name)] = (min(r[0] for r in runs), min(r[1] for r in runs))
    lines = [
        f"start-up, {platform.node()} ({os.cpu_count()} CPUs), best of {args.repeats}",
        "",
        f"A. counting {args.count_preset}'s parameters ({n:,}) layer by layer, one process:",
        "| build | s |",
        "|---|---|",
        f"| initialised (DeepSpeed's count, on every rank) | {real:.2f} |",
        f"| meta (ours) | {meta:.3f} |",
        "",
        "B. resume of 4 layers x hidden 176 (10x tiny) at tp=2, one step:",
        "| stage built | wall s | peak RSS of a rank, MB |",
        "|---|---|---|",
    ]
    for name, (seconds, rss) in results.items():
        lines.append(f"| {name} | {seconds:.2f} | {rss:.0f} |")
    lines += [
        "",
        "D. one TP rank's shard (tp=4) of BLOOM-7B1's 250,880 x 4096 embedding, fresh process:",
        "| init | s | RSS growth, MB |",
        "|---|---|---|",
    ]
    for name, full in (("full init, sliced", True), ("own shard only", False)):
        seconds, mb = min((embedding_shard(full) for _ in range(args.repeats)),
                          key=lambda r: r[0])  # fmt: skip
        lines.append(f"| {name} | {seconds:.2f} | {mb:.0f} |")
    lines += [
        "",
        "C. fresh start at tp=2 (2 local ranks, fp32, one step): "
        "10x tiny; and 2 layers x hidden 1024 with BLOOM's 250,880-token vocabulary",
        "| model | init | wall s | peak RSS of a rank, MB |",
        "|---|---|---|---|",
    ]
    for (label, name), (seconds, rss) in fresh.items():
        lines.append(f"| {label} | {name} | {seconds:.2f} | {rss:.0f} |")
    finish(lines, "startup.py", args.record, argv)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
