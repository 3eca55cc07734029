"""`megatron-ext convert to-hf | from-hf | reshard`: thin wrapper over convert.driver and
convert.trainer_ckpt (see layout.py for the checkpoint layout on our side).

    convert to-hf --checkpoint DIR [--iteration N] --output HF_DIR [--dtype bf16|fp16|fp32]
                  [--tokenizer T] [--max-shard-size S] [--verify]
    convert from-hf --hf-dir HF_DIR --output DIR --tp T --pp P [--dtype ...]
    convert reshard --checkpoint DIR [--iteration N] --output DIR --tp T --pp P
                    [--with-optimizer [--workers W]]
    convert reshard --with-optimizer --universal --checkpoint DIR [--workers W]
The older positional forms (`to-hf CKPT OUT`, `from-hf HF OUT`) still work.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from megatron_ext import precision
from megatron_ext.convert import driver, megatron_deepspeed
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)
DTYPES = list(precision.NAMES)


def _paths(p: argparse.ArgumentParser, first: str, first_help: str) -> None:
    """--FIRST/--output options, plus the same two as optional positionals (older form)."""
    dest = first.lstrip("-").replace("-", "_")
    p.add_argument(f"{dest}_pos", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("output_pos", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(first, dest=dest, help=first_help)
    p.add_argument("--output", help="directory to create (must not exist)")


def _pick(args: argparse.Namespace, name: str, flag: str) -> str:
    value = getattr(args, name) or getattr(args, f"{name}_pos")
    if not value:
        raise UserError(f"convert {args.direction}: {flag} is required")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="trainer checkpoint (any tp, pp) -> HF model dir")
    _paths(to_hf, "--checkpoint", "checkpoint root (with `latest`) or an iter_XXXXXXX dir")
    to_hf.add_argument("--iteration", type=int, help="convert iter N instead of `latest`")
    to_hf.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as saved)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")
    to_hf.add_argument("--tokenizer", help="directory whose tokenizer files are copied")
    to_hf.add_argument(
        "--verify", action="store_true", help="compare transformers' logits with ours (< 1e-4)"
    )
    for name in ("bos", "eos", "pad"):
        to_hf.add_argument(f"--{name}-id", type=int, help=f"{name} token id for the configs")

    from_hf = sub.add_parser("from-hf", help="HF dir -> trainer checkpoint at (tp, pp)")
    _paths(from_hf, "--hf-dir", "HF model directory (config.json + weights)")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1)")
    from_hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (1)")
    from_hf.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as in HF)")

    reshard = sub.add_parser("reshard", help="trainer checkpoint -> another (tp, pp), offline")
    _paths(reshard, "--checkpoint", "checkpoint root (with `latest`) or an iter_XXXXXXX dir")
    reshard.add_argument("--iteration", type=int, help="reshard iter N instead of `latest`")
    reshard.add_argument("--tp", type=int, help="new tensor-parallel size")
    reshard.add_argument("--pp", type=int, help="new pipeline-parallel size")
    reshard.add_argument("--dtype", choices=DTYPES, help="weights dtype (default: as saved)")
    reshard.add_argument(
        "--with-optimizer",
        action="store_true",
        help="also the ZeRO-1 optimizer state and schedule (spawns tp*pp local ranks)",
    )
    reshard.add_argument(
        "--universal",
        action="store_true",
        help="with --with-optimizer, no --output/--tp/--pp: convert the checkpoint in place to "
        "a universal one (<tag>_universal), which `train` at any (tp, pp, dp) loads: how a run "
        "changes layout. Resumable: run it again after a kill",
    )
    reshard.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes converting to the universal checkpoint (memory: each holds one ZeRO "
        "shard file or one parameter's TP slices)",
    )
    # internal: one spawned rank of --with-optimizer (see reshard_optim.py)
    reshard.add_argument("--worker-dir", help=argparse.SUPPRESS)
    reshard.add_argument("--worker-tag", help=argparse.SUPPRESS)
    _add_from_megatron_deepspeed(sub)


def _to_hf(args: argparse.Namespace) -> int:
    out = Path(_pick(args, "output", "--output"))
    ids = {"bos_token_id": args.bos_id, "eos_token_id": args.eos_id, "pad_token_id": args.pad_id}
    driver.export_hf(
        _pick(args, "checkpoint", "--checkpoint"),
        out,
        iteration=args.iteration,
        dtype=args.dtype,
        tokenizer_dir=args.tokenizer,
        max_shard_size=args.max_shard_size,
        token_ids=ids,
    )
    print(f"wrote {out}")
    if not args.verify:
        return 0
    from megatron_ext.convert.trainer_ckpt import open_checkpoint
    from megatron_ext.convert.verify import TOLERANCE, max_logit_diff

    ckpt = open_checkpoint(_pick(args, "checkpoint", "--checkpoint"), args.iteration)
    diff = max_logit_diff(ckpt, out, driver.parse_dtype(args.dtype))
    print(f"verify: max |logits(ours) - logits(transformers)| = {diff:.3e} (limit {TOLERANCE:g})")
    if diff < TOLERANCE:
        return 0
    failed = out.with_name(f"{out.name}.failed-verify-{os.getpid()}")
    shutil.move(out, failed)  # nothing unverified under the final name
    log.error("verification failed: logits differ by %.3e; output moved to %s", diff, failed)
    return 1


def _reshard(args: argparse.Namespace) -> int:
    from megatron_ext.convert import reshard_optim, trainer_ckpt

    src = _pick(args, "checkpoint", "--checkpoint")
    if args.workers < 1:
        raise UserError(f"convert reshard: --workers {args.workers}: give at least 1")
    if args.universal:
        if not args.with_optimizer or args.output or args.output_pos or args.tp or args.pp:
            raise UserError(
                "convert reshard --universal converts in place: give --with-optimizer and "
                "--checkpoint, no --output/--tp/--pp"
            )
        tag_dir = reshard_optim.convert_in_place(src, args.iteration, args.workers)
        print(f"wrote {tag_dir} (train at any tp, pp, dp now resumes from it)")
        return 0
    out = _pick(args, "output", "--output")
    if args.tp is None or args.pp is None:
        raise UserError("convert reshard: --tp and --pp are required (or --universal)")
    if args.worker_dir:
        return reshard_optim.reshard_rank(
            Path(args.worker_dir), args.worker_tag, Path(out), args.tp, args.pp
        )
    if args.with_optimizer:
        if args.dtype:
            raise UserError("convert reshard: --dtype applies to weights-only resharding")
        tag_dir = reshard_optim.reshard_with_optimizer(
            src, out, args.tp, args.pp, iteration=args.iteration, workers=args.workers
        )
        print(f"wrote {tag_dir} (weights, optimizer state, schedule; resume with train)")
        return 0
    tag_dir = trainer_ckpt.reshard(
        src, out, args.tp, args.pp, iteration=args.iteration, dtype=driver.parse_dtype(args.dtype)
    )
    print(f"wrote {tag_dir} (weights only; load with: train --reset-progress ...)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.direction == "from-megatron-deepspeed":
        return _from_megatron_deepspeed(args)
    if args.direction == "to-hf":
        return _to_hf(args)
    if args.direction == "from-hf":
        tag_dir = driver.hf_to_pipeline_checkpoint(
            _pick(args, "hf_dir", "--hf-dir"),
            _pick(args, "output", "--output"),
            args.tp,
            args.pp,
            dtype=driver.parse_dtype(args.dtype),
        )
        print(f"wrote {tag_dir} (load with: train --reset-progress checkpoint.load=...)")
        return 0
    if args.direction == "reshard":
        return _reshard(args)
    raise UserError(f"convert: unknown direction {args.direction!r}")


def _add_from_megatron_deepspeed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "from-megatron-deepspeed",
        help="Megatron-DeepSpeed (BLOOM or Llama layer files) or universal checkpoint -> ours",
    )
    p.add_argument("--input", required=True, help="checkpoint root (latest) or global_stepN dir")
    p.add_argument("--output", required=True, help="checkpoint root to create (must not exist)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (1)")
    p.add_argument("--dtype", choices=list(driver.DTYPE_NAMES), help="default: as stored")
    p.add_argument(
        "--hf-config", help="BLOOM or Llama config.json (default: Megatron's saved args)"
    )
    p.add_argument("--vocab-size", type=int, help="keep this many embedding rows (no padding)")


def _from_megatron_deepspeed(args: argparse.Namespace) -> int:
    tag_dir = megatron_deepspeed.convert(
        args.input, args.output, args.tp, args.pp,
        dtype=args.dtype, hf_config=args.hf_config, vocab_size=args.vocab_size,
    )  # fmt: skip
    print(f"wrote {tag_dir} (load with: train --reset-progress checkpoint.load=...)")
    return 0
