"""`megatron-ext preprocess`: corpora -> `PREFIX.bin`/`PREFIX.idx` (see data/preprocess.py)."""

from __future__ import annotations

import argparse

from megatron_ext.data.inputs import DEFAULT_MAX_RECORD_BYTES
from megatron_ext.data.preprocess import PreprocessConfig, preprocess


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".jsonl/.json/.txt files (optionally .gz/.zst), directories or globs",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing PREFIX.bin/PREFIX.idx"
    )
    p.add_argument(
        "--tokenizer",
        required=True,
        help="tokenizer.json, SentencePiece .model, or a train-tokenizer directory",
    )
    p.add_argument("--json-key", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document token")
    p.add_argument(
        "--eod-token", default=None, help="end-of-document token or id (default: tokenizer's)"
    )
    p.add_argument(
        "--strict", action="store_true", help="stop at the first bad record instead of skipping it"
    )
    p.add_argument(
        "--txt-mode",
        choices=["file", "blank-line"],
        default="file",
        help=".txt inputs: one document per file (default) or per blank-line-separated block",
    )
    p.add_argument(
        "--max-record-bytes",
        type=int,
        default=DEFAULT_MAX_RECORD_BYTES,
        metavar="N",
        help="a longer record (JSON line, .txt block or file) is a bad record: skipped and "
        f"counted, or an error with --strict (default: {DEFAULT_MAX_RECORD_BYTES >> 20} MiB)",
    )
    p.add_argument("--chunk-mb", type=float, default=1.0, help="work unit size in MB (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-mpi", action="store_true", help="ignore an MPI launcher")


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=args.input,
        output_prefix=args.output_prefix,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        workers=args.workers,
        append_eod=args.append_eod,
        eod_token=args.eod_token,
        strict=args.strict,
        txt_mode=args.txt_mode,
        chunk_bytes=max(1, int(args.chunk_mb * (1 << 20))),
        progress=False if args.no_progress else None,
        mpi="off" if args.no_mpi else "auto",
        overwrite=args.overwrite,
        max_record_bytes=args.max_record_bytes,
    )


def run(args: argparse.Namespace) -> int:
    summary = preprocess(config_from_args(args))
    if summary is not None:
        print(summary.format())
    return 0
