"""`megatron-ext curate --input PATH... --output DIR [--config curate.yaml] [--workers N]`.

On several nodes, the same command under `srun` or `mpirun`: the ranks share the work through
DIR.work on a shared file system, and rank 0 writes DIR (`curate.work`)."""

from __future__ import annotations

import argparse

from megatron_ext.log import get_logger

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", nargs="+", required=True, help="JSONL/txt files (.gz/.zst), dirs, globs"
    )
    p.add_argument("--output", required=True, help="a new directory")
    p.add_argument("--config", default=None, help="curate.yaml (default: the Finnish defaults)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes on this node (each unit of work runs in one)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record")


def run(args: argparse.Namespace) -> int:
    from megatron_ext.curate import config, pipeline

    cfg = config.load(args.config)
    report = pipeline.curate(args.input, args.output, cfg, max(1, args.workers), args.strict)
    if report is None:  # not rank 0 of a multi-node run: rank 0 writes the output
        return 0
    print(pipeline.report_table(report))
    print(f"{report['kept']:,} of {report['documents']:,} documents kept in {args.output}/kept")
    return 0
