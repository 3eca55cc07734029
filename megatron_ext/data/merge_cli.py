"""`megatron-ext merge-datasets`: concatenate indexed datasets with the same dtype."""

from __future__ import annotations

import argparse

from megatron_ext.data.indexed_dataset import merge_datasets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inputs", nargs="+", required=True, metavar="PREFIX", help="datasets to join, in order"
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")


def run(args: argparse.Namespace) -> int:
    merged = merge_datasets(args.inputs, args.output_prefix)
    print(
        f"merged {len(args.inputs)} datasets into {args.output_prefix}: "
        f"{merged.num_documents:,} documents, {merged.num_tokens:,} tokens ({merged.dtype})"
    )
    return 0
