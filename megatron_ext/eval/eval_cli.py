"""`megatron-ext eval`: lm-evaluation-harness on a trainer checkpoint or a Hugging Face dir.

    megatron-ext eval --checkpoint DIR --tokenizer TOK --tasks fi_gimp_completion
    megatron-ext eval --hf-dir HF_DIR --task-dir FIN-bench/data --num-fewshot 3 --output r.json
    megatron-ext eval --hf-dir HF_DIR --include-path my_yaml_tasks --tasks fi_gimp_completion
    megatron-ext eval --compare run1.json run2.json ...

`--checkpoint` converts the checkpoint (its `latest`, or `--iteration`) to Hugging Face once,
into DIR/hf-cache/<tag>/ next to the tag directories, and reuses that on later calls while the
checkpoint's content is the same (eval/hf_cache.py).
Tasks: the bundled ones (megatron_ext/assets/tasks), every BIG-bench `task.json` under
`--task-dir`, the lm-eval task YAMLs under `--include-path` (FIN-bench v2's format, datasets
from local files: `dataset_path: json`, `dataset_kwargs: {data_files: ...}`), or lm-eval's own
task names (their datasets must already be in the local Hugging Face cache: nothing is
downloaded). Without --tasks, every task of --task-dir and --include-path. Every task file is
checked before any model is loaded. Prints a table; `--output` keeps lm-eval's JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.eval.hf_cache import hf_cache_for


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="trainer checkpoint root (or an iter_* tag dir)")
    src.add_argument("--hf-dir", help="Hugging Face model directory (with tokenizer files)")
    src.add_argument(
        "--compare", nargs="+", metavar="RESULTS", help="results JSONs to put side by side"
    )
    p.add_argument("--iteration", type=int, help="checkpoint iteration (default: its latest)")
    p.add_argument("--tokenizer", help="tokenizer dir copied into the converted checkpoint")
    p.add_argument("--tasks", default="", help="comma-separated task names")
    p.add_argument("--task-dir", help="directory of BIG-bench task.json files (FIN-bench layout)")
    p.add_argument(
        "--include-path", help="directory of lm-eval task YAMLs (lm-eval's --include_path)"
    )
    p.add_argument("--num-fewshot", type=int, help="shots per prompt (default: 0)")
    p.add_argument("--limit", type=float, help="at most N examples per task (<1: a fraction)")
    p.add_argument("--batch-size", type=int, default=8, help="(default: 8)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="(default: cuda if available)")
    p.add_argument("--max-length", type=int, help="context length (default: the model's)")
    p.add_argument("--log-samples", action="store_true", help="keep per-example outputs")
    p.add_argument("--output", help="write lm-eval's results JSON here")


def compare(paths: list[str]) -> str:
    from megatron_ext.eval.harness import format_table, read_results, run_label

    runs = [(run_label(Path(p), r), r) for p, r in ((p, read_results(p)) for p in paths)]
    labels = [name for name, _ in runs]
    if len(set(labels)) < len(labels):  # same model twice: tell the columns apart by file
        runs = [(str(p), r) for p, (_, r) in zip(paths, runs, strict=True)]
    return format_table(runs)


def run(args: argparse.Namespace) -> int:
    from megatron_ext.eval.harness import (
        EvalRequest,
        evaluate,
        format_table,
        write_json_atomic,
    )
    from megatron_ext.eval.tasks import resolve

    if args.compare:
        print(compare(args.compare))
        return 0
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    # checks every task.json and task YAML before any work
    ours, others = resolve(names, args.task_dir, args.include_path)
    if args.hf_dir:
        hf_dir = Path(args.hf_dir)
    else:
        hf_dir = hf_cache_for(args.checkpoint, args.iteration, args.tokenizer)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA/ROCm device visible to torch")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = evaluate(
        EvalRequest(
            hf_dir=hf_dir,
            tasks=ours,
            other_tasks=others,
            num_fewshot=args.num_fewshot,
            limit=limit,
            batch_size=args.batch_size,
            device=device,
            max_length=args.max_length,
            log_samples=args.log_samples,
            include_path=Path(args.include_path) if args.include_path else None,
        )
    )
    print(format_table([(hf_dir.name, results)]))
    if args.output:
        write_json_atomic(Path(args.output), results)
        print(f"results: {args.output}")
    return 0
