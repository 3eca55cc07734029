"""`megatron-ext` command line: a thin dispatcher; each subcommand lives next to its logic.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megatron_ext.errors import UserError

MAX_ERROR_CHARS = 4000

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "curate": (
        "megatron_ext.curate.curate_cli",
        "deduplicate, filter and PII-mask a corpus before preprocessing",
    ),
    "preprocess": ("megatron_ext.data.preprocess_cli", "tokenize corpora into .bin/.idx datasets"),
    "train-tokenizer": ("megatron_ext.data.tokenizer_cli", "train a BPE or unigram tokenizer"),
    "merge-datasets": ("megatron_ext.data.merge_cli", "concatenate indexed datasets"),
    "inspect": ("megatron_ext.data.inspect_cli", "summarise or decode an indexed dataset"),
    "inspect-blend": (
        "megatron_ext.data.blend_cli",
        "show how a blend turns into samples per source",
    ),
    "build-index": ("megatron_ext.data.blend_cli", "prebuild the sample/blend indices of a run"),
    "slurm": ("megatron_ext.launch.slurm_cli", "render, submit and follow Slurm jobs of a run"),
    "plan": ("megatron_ext.planner.plan_cli", "propose a parallel layout that fits memory"),
    "describe": ("megatron_ext.models.describe_cli", "parameter counts of a model preset or YAML"),
    "train": (
        "megatron_ext.training.train_cli",
        "train a model (DeepSpeed pipeline + ZeRO-1 + TP)",
    ),
    "rehearse": (
        "megatron_ext.training.rehearse",
        "walk a run's start-up and checkpoint layout at its real world size, in one process",
    ),
    "rollback": (
        "megatron_ext.training.rollback",
        "resume a run from an earlier checkpoint, skipping given samples (after a loss spike)",
    ),
    "evaluate": (
        "megatron_ext.training.evaluate_cli",
        "validation loss/perplexity of a checkpoint",
    ),
    "convert": ("megatron_ext.convert.convert_cli", "convert checkpoints to/from Hugging Face"),
    "eval": ("megatron_ext.eval.eval_cli", "lm-evaluation-harness tasks on a checkpoint or HF dir"),
    "quickstart": ("megatron_ext.quickstart", "run the whole pipeline on the bundled sample"),
}


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher (and torch.distributed.launch) put `--local_rank=N` right after
    `-m megatron_ext`, before the command; LOCAL_RANK in the environment says the same."""
    while argv and argv[0].replace("-", "_").startswith("__local_rank"):
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    return argv


def main(argv: list[str] | None = None) -> int:
    code = _run(argv)
    if argv is None:  # a program, not a caller: see exit_after_shutdown
        exit_after_shutdown(code)
    return code


def exit_after_shutdown(code: int) -> None:
    """Leave with os._exit (after flushing) when this process made a process group.

    Trap (training/engine.py): even after barrier + destroy_process_group, about one rank in a
    hundred aborted in interpreter finalization with "terminate called without an active
    exception" (gloo work destroyed while the interpreter goes away), and a rank leaving after
    a timed-out collective (exit 4, no shutdown possible) aborts there the same way, turning
    its exit code into 134. Nothing is left to run once `run` returned, so skipping
    finalization loses nothing; logs are flushed first."""
    engine = sys.modules.get("megatron_ext.training.engine")
    if engine is None or not engine.group_was_used():
        return
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _run(argv: list[str] | None) -> int:
    argv = _drop_local_rank(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megatron-ext")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        # Import only the module of the command being run (fast start, no torch for data tools).
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(sp)
    args = parser.parse_args(argv)
    # no command runs code from a pickle: every torch.load is weights-only (and its children's)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        text = str(exc)
        if len(text) > MAX_ERROR_CHARS:  # never a 351 MB error (a value printed whole)
            text = text[:MAX_ERROR_CHARS] + f" ... ({len(text) - MAX_ERROR_CHARS} more characters)"
        print(f"megatron-ext {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megatron-ext {args.command}: interrupted", file=sys.stderr)
        return 130
