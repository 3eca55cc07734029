"""`megatron-ext quickstart`: the whole pipeline on the bundled Finnish sample, in one run dir.

Steps so far: train a tokenizer, preprocess the sample into an indexed dataset, inspect it,
train a tiny BLOOM with tensor parallelism (TP=2 over two local processes) in two legs (the
second resumes the first's checkpoint), evaluate it and plot `loss_curve.png`. Each finished
step leaves a marker in the run directory, so running the command again continues instead of
redoing. (Conversion joins as that part lands.)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from megatron_ext.log import get_logger

log = get_logger(__name__)

TRAIN_STEPS = 300  # about 50 s at TP=2 on 2 cores (two legs of 150)


def train_overrides(prefix: Path, ckpt: Path, vocab_size: int, steps: int) -> list[str]:
    """The quickstart run: tiny BLOOM, TP=2, seq 64, global batch 8, cosine over `steps`."""
    return [
        "model.preset=tiny",
        f"model.vocab_size={vocab_size}",
        "parallel.tp=2",
        f"data.path={prefix}",
        "data.seq_length=64",
        "data.split=949,50,1",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
        "optim.lr=3e-3",
        "optim.min_lr=3e-4",
        "optim.warmup_iters=10",
        f"optim.decay_iters={steps}",  # the same schedule in both legs
        f"checkpoint.dir={ckpt}",
        f"checkpoint.interval={max(1, steps // 4)}",
        "logging.eval_interval=50",
        "logging.eval_iters=2",
    ]


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
    p.add_argument("--train-steps", type=int, default=TRAIN_STEPS, help=f"(default: {TRAIN_STEPS})")


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

    ckpt = run_dir / "train"

    def train_step() -> dict:
        from megatron_ext.training.launch import spawn_local
        from megatron_ext.training.metrics import plot_loss_curve, read_metrics

        base = train_overrides(prefix, ckpt, args.vocab_size, args.train_steps)
        for leg, steps in enumerate((args.train_steps // 2, args.train_steps), start=1):
            log.info("training leg %d: to step %d (TP=2, 2 local processes)", leg, steps)
            code = spawn_local(2, ["train", *base, f"train.iterations={steps}"])
            if code != 0:
                raise RuntimeError(f"training leg {leg} failed with exit code {code}")
        rows = read_metrics(ckpt / "metrics.jsonl")
        png = plot_loss_curve(ckpt / "metrics.jsonl", run_dir / "loss_curve.png")
        loss = [r["loss"] for r in rows if r.get("loss") is not None]
        val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        return {
            "checkpoint": str(ckpt),
            "steps": rows[-1]["step"],
            "first_loss": loss[0],
            "last_loss": loss[-1],
            "last_val_loss": val[-1] if val else None,
            "loss_curve": str(png),
        }

    results = {
        "tokenizer": _step(run_dir, "tokenizer", tokenizer_step),
        "preprocess": _step(run_dir, "preprocess", preprocess_step),
        "dataset": describe(IndexedDataset(prefix)),
        "train": _step(run_dir, "train", train_step),
    }
    (run_dir / "summary.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    info = results["dataset"]
    print(
        f"dataset {prefix}: {info['documents']:,} documents, {info['tokens']:,} tokens ({info['dtype']})"
    )
    t = results["train"]
    print(
        f"trained tiny BLOOM (TP=2) for {t['steps']} steps: loss {t['first_loss']:.3f} -> "
        f"{t['last_loss']:.3f}; curve {t['loss_curve']}"
    )
    print(f"summary: {run_dir / 'summary.json'}")
    return 0
