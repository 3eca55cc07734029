"""`megatron-ext evaluate --checkpoint DIR --data-path PREFIX [--seq-length L] [--num-samples N]
[--json]`: validation loss and perplexity of a checkpoint over a dataset.

By default every sample of the dataset (all its documents, samples of L + 1 tokens as in
training) is evaluated exactly once; `--num-samples N` takes the first N of that pass (the same
shuffled order) and more than the dataset holds is refused. The loss is the mean over those
samples, each counted once: whole rounds of micro_batch_size x dp samples, then the last partial
round one sample per micro-batch (see `mean_loss`). The JSON says how many were evaluated.
A blend of several sources is refused (every sample once is not defined for it).

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
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="evaluate the first N samples (default: every sample of the dataset, once)",
    )
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--tp", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--nproc-per-node", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _checkpoint_config(ckpt: Path, tag: str) -> RunConfig:
    """The run config saved in the checkpoint that will be evaluated (not `latest`'s)."""
    cfg_path = ckpt / tag / "config.yaml"
    return saved_run_config(cfg_path)


def dataset_samples(data_path: str, seq_length: int) -> int:
    """Samples of seq_length + 1 tokens in one pass over every token of the prefix `data_path`
    (evaluate reads all of its documents: split 1,0,0)."""
    from megatron_ext.data.blend import as_blend, open_blend
    from megatron_ext.data.index_helpers import max_samples

    sources = open_blend(as_blend(data_path))
    if len(sources) != 1:
        raise UserError(
            f"--data-path {data_path}: a blend of {len(sources)} sources, in which every sample "
            "once is not defined; evaluate each source's prefix on its own"
        )
    return max_samples(int(sources[0].sizes.sum(dtype="int64")), seq_length)


def samples_to_evaluate(data_path: str, seq_length: int, num_samples: int | None) -> int:
    """--num-samples checked against the dataset's size (None: all of it)."""
    size = dataset_samples(data_path, seq_length)
    if size == 0:
        raise UserError(
            f"{data_path}: fewer than {seq_length + 1} tokens, not one sample; pass a smaller "
            "--seq-length"
        )
    if num_samples is None:
        return size
    if not 1 <= num_samples <= size:
        raise UserError(
            f"--num-samples {num_samples}: {data_path} holds {size} samples of {seq_length} "
            f"tokens, and evaluating more would repeat samples; pass 1..{size}, or leave "
            "--num-samples out to evaluate each sample once"
        )
    return num_samples


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


def _micro_batch(dataset, first: int, size: int) -> tuple:
    from megatron_ext.data.sampler import collate_samples

    batch = collate_samples([dataset[i] for i in range(first, first + size)])
    return batch["tokens"], batch["labels"]


def _weighted_losses(engine, dataset, start: int, end: int, micro_batch_size: int):
    """float64 [sum of micro-batch loss x its samples, samples] over samples [start, end) on
    this rank's last pipeline stage (zeros on the others). Micro-batch m of DP rank r holds
    samples start + (m * dp + r) * micro_batch_size + [0, micro_batch_size), as in training;
    one past `end` (only with micro_batch_size 1) reads sample 0 and counts 0."""
    import torch

    c = engine.ctx
    rounds = -(-(end - start) // (micro_batch_size * c.dp_size))
    firsts = [start + (m * c.dp_size + c.dp_rank) * micro_batch_size for m in range(rounds)]
    weights = [micro_batch_size if f < end else 0 for f in firsts]
    batches = (
        _micro_batch(dataset, f if w else 0, micro_batch_size)
        for f, w in zip(firsts, weights, strict=True)
    )
    engine.ds.reset_activation_shape()  # the micro-batch size may differ from the last call's
    losses = engine.ds.eval_batch(
        batches, reduce_output=None, bcast_loss=False, num_micro_batches=rounds
    )
    if not engine.ds.is_last_stage():
        return torch.zeros(2, dtype=torch.float64)
    total = sum(float(loss) * w for loss, w in zip(losses, weights, strict=True) if w)
    return torch.tensor([total, sum(weights)], dtype=torch.float64)


def mean_loss(engine, dataset, num_samples: int, micro_batch_size: int) -> tuple[float, int]:
    """(mean loss over samples 0..num_samples-1 of `dataset`, each read once; samples counted).

    Whole rounds of micro_batch_size x dp samples first, then the rest (fewer than a round) one
    sample per micro-batch, so that no micro-batch mixes samples with stand-ins. Every sample
    has seq_length tokens: micro-batch losses weighted by their samples give the mean over every
    token once. Collectives: the pipeline's p2p in forward, then one all-reduce over all ranks
    (each TP rank of a last stage adds the same values: the ratio is unchanged)."""
    import torch
    import torch.distributed as dist

    c = engine.ctx
    full = num_samples // (micro_batch_size * c.dp_size) * micro_batch_size * c.dp_size
    total = torch.zeros(2, dtype=torch.float64)
    for start, end, size in ((0, full, micro_batch_size), (full, num_samples, 1)):
        if end > start:
            total += _weighted_losses(engine, dataset, start, end, size)
    total = total.to(c.device)
    dist.all_reduce(total)
    return float(total[0] / total[1]), round(float(total[1]) / c.tp_size)


def evaluate_here(args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_ext.data.blend import build_datasets
    from megatron_ext.training import checkpointing
    from megatron_ext.training import engine as engine_mod
    from megatron_ext.training.ranks import export_dist_env

    tag = checkpointing.newest_complete(Path(args.checkpoint))
    seq_length = args.seq_length or _checkpoint_config(Path(args.checkpoint), tag).data.seq_length
    num_samples = samples_to_evaluate(args.data_path, seq_length, args.num_samples)
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
    (dataset, _, _) = build_datasets(
        cfg.data.path, cfg.data.seq_length, (num_samples, 0, 0), split="1,0,0", seed=cfg.data.seed
    )
    loss, counted = mean_loss(engine, dataset, num_samples, cfg.train.micro_batch_size)
    engine_mod.shutdown()
    return {
        "checkpoint": args.checkpoint,
        "tag": tag,
        "iteration": int(tag.removeprefix("iter_")),
        "data_path": args.data_path,
        "samples": counted,
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
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--pp",
            str(args.pp),
        ]
        argv += ["--seq-length", str(args.seq_length)] if args.seq_length else []
        argv += ["--num-samples", str(args.num_samples)] if args.num_samples else []
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
