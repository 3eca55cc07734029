"""`megatron-ext convert to-hf | from-hf`: thin wrapper over convert.driver (see layout.py for
the checkpoint layout on our side)."""

from __future__ import annotations

import argparse

from megatron_ext.convert import driver
from megatron_ext.convert.safetensors_io import parse_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="our checkpoint (root or iter_XXXXXXX dir) -> HF dir")
    to_hf.add_argument("checkpoint", help="checkpoint root (with `latest`) or a tag directory")
    to_hf.add_argument("output", help="HF model directory to create (must not exist)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="per safetensors file (5GB)")
    to_hf.add_argument("--tokenizer", help="directory whose tokenizer files are copied")
    for name in ("bos", "eos", "pad"):
        to_hf.add_argument(f"--{name}-id", type=int, help=f"{name} token id for the configs")
    from_hf = sub.add_parser("from-hf", help="HF dir -> our checkpoint root (iter_0000000)")
    from_hf.add_argument("hf_dir", help="HF model directory (config.json + weights)")
    from_hf.add_argument("output", help="checkpoint root to create (must not exist)")
    from_hf.add_argument("--tp", type=int, default=1, help="tensor-parallel size to shard for")


def run(args: argparse.Namespace) -> int:
    if args.direction == "from-hf":
        tag_dir = driver.hf_to_pipeline_checkpoint(args.hf_dir, args.output, args.tp)
        print(f"wrote {tag_dir}")
        return 0
    ids = {"bos_token_id": args.bos_id, "eos_token_id": args.eos_id, "pad_token_id": args.pad_id}
    out = driver.pipeline_checkpoint_to_hf(
        args.checkpoint,
        args.output,
        max_shard_size=parse_size(args.max_shard_size),
        tokenizer_dir=args.tokenizer,
        token_ids=ids,
    )
    print(f"wrote {out}")
    return 0
