"""`megatron-ext evaluate --checkpoint DIR --data-path PREFIX [--seq-length L] [--num-samples N]
[--json]`: validation loss and perplexity of a checkpoint over a dataset.

The model comes from the checkpoint's saved `config.yaml`; the layout is free (`--tp`, `--pp`,
dp = the remaining ranks; same launchers as `train`, or `--nproc-per-node N`). The checkpoint's
per-layer files load at any pipeline or data-parallel size; a different TP size needs the
checkpoint resharded first (`megatron-ext convert reshard --tp T`; the error says so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.training.config import RunConfig, saved_run_config

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint dir: its newest complete checkpoint (`latest` first) is evaluated",
    )
    p.add_argument("--data-path", required=True, help="dataset prefix (.bin/.idx)")
    p.add_argument("--seq-length", type=int, default=None, help="default: the run's")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tp", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _checkpoint_config(ckpt: Path, tag: str) -> RunConfig:
    """The run config saved in the checkpoint that will be evaluated (not `latest`'s)."""
    cfg_path = ckpt / tag / "config.yaml"
    return saved_run_config(cfg_path)


def eval_config(args: argparse.Namespace, world_size: int, tag: str) -> RunConfig:
    cfg = _checkpoint_config(Path(args.checkpoint), tag)
    saved_tp = cfg.parallel.tp
    cfg.parallel.tp = args.tp or saved_tp
    cfg.parallel.pp = args.pp
    if cfg.parallel.tp != saved_tp:
        raise UserError(
            f"{args.checkpoint} was saved at tp={saved_tp}; evaluating at tp={cfg.parallel.tp} "
            f"needs its TP shards re-sliced: use --tp {saved_tp}, or first run "
            f"`megatron-ext convert reshard --checkpoint {args.checkpoint} --output NEW "
            f"--tp {cfg.parallel.tp} --pp 1` and evaluate NEW"
        )
    dp = cfg.data_parallel_size(world_size)
    cfg.data.path, cfg.data.blend = args.data_path, None
    cfg.data.seq_length = args.seq_length or cfg.data.seq_length
    # the model keeps the length it was trained at, or more when evaluating longer sequences
    cfg.model.seq_length = max(cfg.model.seq_length, cfg.data.seq_length)
    cfg.train.micro_batch_size = args.micro_batch_size
    cfg.train.global_batch_size = args.micro_batch_size * dp
    cfg.checkpoint.load = args.checkpoint
    return cfg


def evaluate_here(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_ext.data.blend import build_datasets
    from megatron_ext.training import checkpointing
    from megatron_ext.training import engine as engine_mod
    from megatron_ext.training.ranks import export_dist_env
    from megatron_ext.training.trainer import evaluate_loss

    tag = checkpointing.newest_complete(Path(args.checkpoint))
    export_dist_env()
    engine_mod.init_distributed(600.0)
    cfg = eval_config(args, dist.get_world_size(), tag)
    model_config = cfg.model
    engine = engine_mod.build_engine(cfg, model_config)
    failures: list[str] = []
    found = checkpointing.load(
        engine, args.checkpoint, weights_only=True, only_tag=tag, failures=failures
    )
    if found is None:
        raise UserError(f"{args.checkpoint}: {tag} does not load: {'; '.join(failures)}")
    gbs = cfg.train.global_batch_size
    num_batches = max(1, args.num_samples // gbs)
    (dataset, _, _) = build_datasets(
        cfg.data.path,
        cfg.data.seq_length,
        (num_batches * gbs, 0, 0),
        split="1,0,0",
        seed=cfg.data.seed,
    )
    loss = evaluate_loss(engine, dataset, num_batches, cfg.train.micro_batch_size)
    engine_mod.shutdown()
    return {
        "checkpoint": args.checkpoint,
        "tag": tag,
        "iteration": int(tag.removeprefix("iter_")),
        "data_path": args.data_path,
        "samples": num_batches * gbs,
        "seq_length": cfg.data.seq_length,
        "loss": loss if math.isfinite(loss) else None,  # JSON has no NaN
        "perplexity": math.exp(min(loss, 50.0)) if math.isfinite(loss) else None,
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": engine.ctx.dp_size},
    }


def run(args: argparse.Namespace) -> int:
    if args.nproc_per_node:
        from megatron_ext.training.ranks import spawn_local

        argv = [
            "evaluate",
            "--checkpoint",
            args.checkpoint,
            "--data-path",
            args.data_path,
            "--num-samples",
            str(args.num_samples),
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--pp",
            str(args.pp),
        ]
        argv += ["--seq-length", str(args.seq_length)] if args.seq_length else []
        argv += ["--tp", str(args.tp)] if args.tp else []
        argv += ["--json"] if args.json else []
        return spawn_local(args.nproc_per_node, argv)
    from megatron_ext.log import global_rank

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; ours is the JSON
        result = evaluate_here(args)
    finite = result["loss"] is not None
    if global_rank() == 0:  # the command's output, on rank 0 only
        if args.json:
            print(json.dumps(result, allow_nan=False))
        elif finite:
            print(
                f"{result['tag']}: loss {result['loss']:.4f}  perplexity "
                f"{result['perplexity']:.2f}  ({result['samples']} samples of "
                f"{result['seq_length']} tokens)"
            )
        if not finite:
            log.error("%s/%s: the loss is not finite", args.checkpoint, result["tag"])
    return 0 if finite else 3
