"""Training throughput on CPU: our stack (DeepSpeed pipeline engine + ZeRO-1 + our TP) at DP=2,
PP=2 and TP=2, against plain torch DDP on the same model and data at DP=2 (engine overhead).

    python benchmarks/train_throughput.py --data-path PREFIX [--steps 30] [--out results.json]

Model: BLOOM recipe, 4 layers, hidden 128, 4 heads, vocab 1000, seq 128; micro-batch 4, global
batch 8; fp32; 2 processes, OMP_NUM_THREADS=1. Reported: median tokens/s over the steps after
the first 5 (warm-up), from each run's metrics.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = [
    "model.preset=tiny",
    "model.num_layers=4",
    "model.hidden_size=128",
    "model.num_attention_heads=4",
]
SEQ, MBS, GBS, WARMUP = 128, 4, 8, 5


def ours(data: str, steps: int, pp: int, tp: int, nproc: int = 2, extra: tuple = ()) -> float:
    with tempfile.TemporaryDirectory() as ckpt:
        cmd = [
            sys.executable,
            "-m",
            "megatron_ext",
            "train",
            *MODEL,
            f"data.path={data}",
            f"data.seq_length={SEQ}",
            f"train.iterations={steps}",
            f"train.micro_batch_size={MBS}",
            f"train.global_batch_size={GBS}",
            f"parallel.pp={pp}",
            f"parallel.tp={tp}",
            f"checkpoint.dir={ckpt}",
            "checkpoint.interval=100000",
            "logging.tensorboard=false",
            *extra,
            "--nproc-per-node",
            str(nproc),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        rows = [json.loads(x) for x in (Path(ckpt) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[WARMUP:])


def _ddp_worker(rank: int, world: int, port: int, data: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from megatron_ext.data.blend import build_datasets
    from megatron_ext.data.sampler import build_dataloader
    from megatron_ext.models import build_model, resolve_model_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    spec = {
        "preset": "tiny",
        "num_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "seq_length": SEQ,
    }
    model = build_model(resolve_model_config(spec), seed=1234)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    with tempfile.TemporaryDirectory() as cache:
        train, _, _ = build_datasets(data, SEQ, (steps * GBS, 0, 0), cache_dir=cache)
    loader = iter(
        build_dataloader(
            train,
            consumed_samples=0,
            micro_batch_size=MBS,
            dp_rank=rank,
            dp_size=world,
            num_workers=0,
        )
    )
    times = []
    for _ in range(steps):
        batch = next(loader)
        start = time.perf_counter()
        loss = ddp(batch["tokens"], batch["labels"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def ddp(data: str, steps: int) -> float:
    import torch.multiprocessing as mp

    from megatron_ext.training.ranks import free_port

    os.environ["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "times.json")
        mp.spawn(_ddp_worker, args=(2, free_port(), data, steps, out), nprocs=2)
        times = json.loads(Path(out).read_text())
    return statistics.median(GBS * SEQ / t for t in times[WARMUP:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-path", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = {
        "torch DDP, dp=2": ddp(args.data_path, args.steps),
        "ours, dp=2": ours(args.data_path, args.steps, 1, 1),
        "ours, pp=2": ours(args.data_path, args.steps, 2, 1),
        "ours, tp=2": ours(args.data_path, args.steps, 1, 2),
    }
    for name, tps in results.items():
        print(f"{name:20s} {tps:10.0f} tokens/s")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
