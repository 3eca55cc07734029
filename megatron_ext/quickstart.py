"""`megatron-ext quickstart`: the whole pipeline on the bundled Finnish sample, in one run dir.

Steps: curate the sample (`megatron-ext curate`: deduplication, quality and language filters, PII
masking, decontamination against the bundled tasks), train a tokenizer on what it keeps,
preprocess that into an indexed dataset, inspect it, train a
tiny BLOOM with tensor parallelism (TP=2 over two local processes) in two legs (the second
resumes the first's checkpoint) and plot `loss_curve.png`; convert the checkpoint to Hugging
Face (`hf/`, with the tokenizer), measure its perplexity (`megatron-ext evaluate`, TP=2), run
the bundled tasks through lm-evaluation-harness (`megatron-ext eval`, `eval/results.json`) and
generate a short continuation of a Finnish prompt with transformers. Everything lands in
`summary.json`. Each finished step leaves a marker in the run directory, so running the
command again continues instead of redoing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megatron_ext.log import get_logger

log = get_logger(__name__)

TRAIN_STEPS = 300  # about 50 s at TP=2 on 2 cores (two legs of 150)
EVAL_TASKS = ["fi_gimp_completion", "fi_gimp_generation"]  # megatron_ext/assets/tasks
REPETITION_PENALTY = 1.3
PROMPT = "Tämä suodin"  # "This filter": how many pages of the GIMP manual's filter chapter begin


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
    from megatron_ext.data.indexed_dataset import IndexedDataset
    from megatron_ext.data.inspect_cli import describe
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess
    from megatron_ext.data.tokenizer_training import train_tokenizer
    from megatron_ext.demo.gimp_corpus import sample_corpus_path
    from megatron_ext.eval.harness import go_offline

    go_offline()  # nothing here downloads; make sure transformers/datasets never try
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    curated = run_dir / "curated"
    tok_dir = run_dir / "tokenizer"
    prefix = run_dir / "data" / "fi_sample"

    def curate_step() -> dict:
        import shutil

        from megatron_ext.curate import config, pipeline

        shutil.rmtree(curated, ignore_errors=True)  # left by a run stopped before its marker
        report = pipeline.curate([str(sample_corpus_path())], str(curated), config.load(None),
                                 workers=args.workers)  # fmt: skip
        print(pipeline.report_table(report))
        keys = ("documents", "kept", "removed_by_step", "pii_masked")
        return {**{k: report[k] for k in keys}, "report": str(curated / "report.md")}

    def corpus() -> list[str]:
        return [str(p) for p in sorted((curated / "kept").glob("*.jsonl"))]

    def tokenizer_step() -> dict:
        train_tokenizer(corpus(), args.vocab_size, tok_dir, kind="bpe")
        return {"tokenizer": str(tok_dir)}

    def preprocess_step() -> dict:
        summary = preprocess(
            PreprocessConfig(
                inputs=corpus(),
                output_prefix=str(prefix),
                tokenizer=str(tok_dir),
                workers=args.workers,
                append_eod=True,
                overwrite=True,  # a step left unfinished by an earlier quickstart is redone
            )
        )
        print(summary.format())
        return {"prefix": str(prefix), "documents": summary.documents, "tokens": summary.tokens}

    ckpt = run_dir / "train"

    def train_step() -> dict:
        from megatron_ext.training.metrics import plot_loss_curve, read_metrics
        from megatron_ext.training.ranks import spawn_local

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

    hf_dir = run_dir / "hf"

    def convert_step() -> dict:
        import shutil

        from megatron_ext.convert.driver import export_hf

        shutil.rmtree(hf_dir, ignore_errors=True)  # left by a run stopped before its marker
        export_hf(ckpt, hf_dir, tokenizer_dir=tok_dir)
        return {"hf_dir": str(hf_dir)}

    def perplexity_step() -> dict:
        return perplexity(ckpt, prefix)

    def eval_step() -> dict:
        return evaluate_tasks(hf_dir, run_dir / "eval" / "results.json")

    def generate_step() -> dict:
        return generate(hf_dir, PROMPT)

    results = {
        "curate": _step(run_dir, "curate", curate_step),
        "tokenizer": _step(run_dir, "tokenizer", tokenizer_step),
        "preprocess": _step(run_dir, "preprocess", preprocess_step),
        "dataset": describe(IndexedDataset(prefix)),
        "train": _step(run_dir, "train", train_step),
        "convert": _step(run_dir, "convert", convert_step),
        "perplexity": _step(run_dir, "perplexity", perplexity_step),
        "eval": _step(run_dir, "eval", eval_step),
        "generate": _step(run_dir, "generate", generate_step),
    }
    (run_dir / "summary.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    c = results["curate"]
    removed = ", ".join(f"{k} {v}" for k, v in c["removed_by_step"].items())
    print(f"curated: {c['kept']} of {c['documents']} documents kept ({removed}); {c['report']}")
    info = results["dataset"]
    print(
        f"dataset {prefix}: {info['documents']:,} documents, {info['tokens']:,} tokens ({info['dtype']})"
    )
    t = results["train"]
    print(
        f"trained tiny BLOOM (TP=2) for {t['steps']} steps: loss {t['first_loss']:.3f} -> "
        f"{t['last_loss']:.3f}; curve {t['loss_curve']}"
    )
    p = results["perplexity"]
    print(
        f"converted to Hugging Face: {hf_dir}; perplexity {p['perplexity']:.1f} (loss {p['loss']:.3f})"
    )
    print(results["eval"]["table"])
    print(f"generated: {results['generate']['text']!r}")
    print(f"summary: {run_dir / 'summary.json'}")
    return 0


def perplexity(ckpt: Path, prefix: Path) -> dict:
    """`megatron-ext evaluate` at the checkpoint's TP=2 (two local processes), as JSON."""
    cmd = [sys.executable, "-m", "megatron_ext", "evaluate", "--checkpoint", str(ckpt)]
    cmd += ["--data-path", str(prefix), "--nproc-per-node", "2", "--json"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"evaluate failed with exit code {proc.returncode}")
    result = json.loads(lines[-1])
    return {k: result[k] for k in ("loss", "perplexity", "samples", "seq_length")}


def evaluate_tasks(hf_dir: Path, output: Path) -> dict:
    """The bundled tasks through lm-eval (what `megatron-ext eval --hf-dir` runs)."""
    from megatron_ext.eval.harness import (
        EvalRequest,
        evaluate,
        format_table,
        metric_rows,
        write_json_atomic,
    )
    from megatron_ext.eval.tasks import resolve

    tasks, _ = resolve(EVAL_TASKS, None)
    res = evaluate(EvalRequest(hf_dir=hf_dir, tasks=tasks, other_tasks=[], device="cpu"))
    write_json_atomic(output, res)
    scores = {f"{t}/{m}": v for (t, m), (v, _) in metric_rows(res).items()}
    return {"results": str(output), "scores": scores, "table": format_table([("score", res)])}


def generate(hf_dir: Path, prompt: str, max_new_tokens: int = 24) -> dict:
    """Greedy continuation of `prompt` by the converted model, with plain transformers. The
    repetition penalty keeps a model this small from repeating one token (measured: "on on on")."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            repetition_penalty=REPETITION_PENALTY,
            pad_token_id=tokenizer.pad_token_id,
        )
    return {
        "prompt": prompt,
        "text": tokenizer.decode(out[0], skip_special_tokens=True),
        "decoding": f"greedy, repetition_penalty={REPETITION_PENALTY}",
        "new_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
    }
