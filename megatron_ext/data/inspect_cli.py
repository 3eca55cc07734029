"""`megatron-ext inspect`: what an indexed dataset holds; decode one document."""

from __future__ import annotations

import argparse
import json

import numpy as np

from megatron_ext.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megatron_ext.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prefix", help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--tokenizer", help="tokenizer for --decode")
    p.add_argument(
        "--decode", type=int, metavar="I", help="print document I (ids, or text with --tokenizer)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def describe(ds: IndexedDataset) -> dict:
    doc_lengths = (
        np.add.reduceat(ds.sequence_lengths.astype(np.int64), ds.document_indices[:-1])
        if ds.num_documents and len(ds)
        else np.zeros(0, np.int64)
    )
    # reduceat gives a wrong value for empty documents (equal boundaries): zero them
    if doc_lengths.size:
        doc_lengths[np.diff(ds.document_indices) == 0] = 0
    pct = (
        {f"p{q}": int(np.percentile(doc_lengths, q)) for q in (0, 10, 50, 90, 99, 100)}
        if doc_lengths.size
        else {}
    )
    return {
        "prefix": ds.prefix,
        "documents": ds.num_documents,
        "sequences": len(ds),
        "tokens": ds.num_tokens,
        "dtype": str(ds.dtype),
        "bin_bytes": int(np.int64(ds.num_tokens) * ds.dtype.itemsize),
        "document_length_percentiles": pct,
        "mean_document_length": float(doc_lengths.mean()) if doc_lengths.size else 0.0,
    }


def run(args: argparse.Namespace) -> int:
    ds = IndexedDataset(args.prefix)
    info = describe(ds)
    if args.decode is not None:
        ids = ds.document(args.decode)
        if args.tokenizer:
            from megatron_ext.data.tokenizer import load_tokenizer

            info["decoded"] = load_tokenizer(args.tokenizer).decode(ids.tolist())
        info["document"] = args.decode
        info["ids"] = ids.tolist()
    if args.json:
        print(json.dumps(info, ensure_ascii=False, indent=2))
        return 0
    print(f"{data_file_path(ds.prefix)} + {index_file_path(ds.prefix)}")
    print(
        f"documents: {info['documents']:,}  sequences: {info['sequences']:,}  "
        f"tokens: {info['tokens']:,}  dtype: {info['dtype']}"
    )
    if info["document_length_percentiles"]:
        pcts = "  ".join(f"{k}={v}" for k, v in info["document_length_percentiles"].items())
        print(f"document length (tokens): mean={info['mean_document_length']:.1f}  {pcts}")
    if args.decode is not None:
        print(f"document {args.decode}: {len(info['ids'])} tokens")
        print(info.get("decoded", info["ids"]))
    return 0


__all__ = ["describe", "run", "add_arguments", "UserError"]
