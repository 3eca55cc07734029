"""`megatron-ext quickstart`: the whole pipeline on the bundled Finnish sample, in one run dir.

Steps so far: train a tokenizer, preprocess the sample into an indexed dataset, inspect it.
(Training, conversion and evaluation join as those parts land.) Each finished step leaves a
marker in the run directory, so running the command again continues instead of redoing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from megatron_ext.log import get_logger

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run-dir",
        default="quickstart-run",
        help="where every step writes (default: ./quickstart-run)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=8000, help="tokenizer vocabulary (default: 8000)"
    )
    p.add_argument("--workers", type=int, default=2, help="preprocessing workers (default: 2)")


def _step(run_dir: Path, name: str, fn: Callable[[], dict]) -> dict:
    marker = run_dir / f".done-{name}.json"
    if marker.is_file():
        log.info("step %s: already done (%s), skipping", name, marker)
        return json.loads(marker.read_text())
    log.info("step %s ...", name)
    start = time.perf_counter()
    result = fn()
    result["seconds"] = round(time.perf_counter() - start, 2)
    marker.write_text(json.dumps(result, indent=2))
    return result


def run(args: argparse.Namespace) -> int:
    from megatron_ext.data.html_corpus import sample_corpus_path
    from megatron_ext.data.indexed_dataset import IndexedDataset
    from megatron_ext.data.inspect_cli import describe
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess
    from megatron_ext.data.tokenizer_training import train_tokenizer

    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    corpus = str(sample_corpus_path())
    tok_dir = run_dir / "tokenizer"
    prefix = run_dir / "data" / "fi_sample"

    def tokenizer_step() -> dict:
        train_tokenizer([corpus], args.vocab_size, tok_dir, kind="bpe")
        return {"tokenizer": str(tok_dir)}

    def preprocess_step() -> dict:
        summary = preprocess(
            PreprocessConfig(
                inputs=[corpus],
                output_prefix=str(prefix),
                tokenizer=str(tok_dir),
                workers=args.workers,
                append_eod=True,
            )
        )
        print(summary.format())
        return {"prefix": str(prefix), "documents": summary.documents, "tokens": summary.tokens}

    results = {
        "tokenizer": _step(run_dir, "tokenizer", tokenizer_step),
        "preprocess": _step(run_dir, "preprocess", preprocess_step),
        "dataset": describe(IndexedDataset(prefix)),
    }
    (run_dir / "summary.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    info = results["dataset"]
    print(
        f"dataset {prefix}: {info['documents']:,} documents, {info['tokens']:,} tokens ({info['dtype']})"
    )
    print(f"summary: {run_dir / 'summary.json'}")
    return 0
