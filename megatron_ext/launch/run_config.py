"""The parts of a run config (RUN.yaml plus `dotted.key=value` overrides) that a job script needs.

The trainer owns the full schema; here we only read what decides the job's shape and its
stopping point: `parallel.tp`, `parallel.pp`, `train.iterations`, `train.micro_batch_size`,
`train.global_batch_size`, `checkpoint.dir`, with the trainer's defaults. Files and overrides go
through the trainer's parser (`megatron_ext.config`: `optim.lr=3e-4`, values parsed as YAML).
When the job runs `megatron-ext train`, the whole config is also checked against its schema
(`check_for_trainer`), so a typo is refused before the job waits in the queue.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_ext import config as config_io
from megatron_ext.errors import UserError
from megatron_ext.training.config import CheckpointConfig, ParallelConfig, RunConfig, TrainConfig


@dataclass(frozen=True)
class RunShape:
    tp: int
    pp: int
    iterations: int
    micro_batch_size: int
    global_batch_size: int
    checkpoint_dir: str  # absolute


def load_run_config(path: str | Path, overrides: list[str] = ()) -> dict:
    """RUN.yaml as a plain dict with the overrides applied (the trainer's parser and syntax)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"run config {path} does not exist: pass --config RUN.yaml")
    return config_io.apply_overrides(config_io.read_yaml(path), list(overrides), where=str(path))


def check_for_trainer(cfg: dict, source: str) -> None:
    """Refuse a config `megatron-ext train` would refuse (unknown keys, wrong types)."""
    run = config_io.from_dict(RunConfig, copy.deepcopy(cfg), where=source)
    try:
        run.validate()
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def run_shape(cfg: dict, source: str, base_dir: Path | None = None) -> RunShape:
    """Read the job-relevant keys; a relative checkpoint.dir is taken from base_dir (the cwd)."""

    def need_int(key: str, default: int) -> int:
        value = get(cfg, key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{source}: {key} must be a positive integer (got {value!r})")
        return value

    ckpt = get(cfg, "checkpoint.dir", CheckpointConfig.dir)
    if not ckpt:
        raise UserError(
            f"{source}: checkpoint.dir is empty; a job needs it to save before the time limit "
            "and resume (checkpoint.dir: PATH)"
        )
    ckpt_path = Path(str(ckpt)).expanduser()
    if not ckpt_path.is_absolute():
        ckpt_path = (base_dir or Path.cwd()) / ckpt_path
    # Defaults are the trainer's, so a key left out means the same here as in the trainer.
    return RunShape(
        tp=need_int("parallel.tp", ParallelConfig.tp),
        pp=need_int("parallel.pp", ParallelConfig.pp),
        iterations=need_int("train.iterations", TrainConfig.iterations),
        micro_batch_size=need_int("train.micro_batch_size", TrainConfig.micro_batch_size),
        global_batch_size=need_int("train.global_batch_size", TrainConfig.global_batch_size),
        checkpoint_dir=str(ckpt_path.resolve()),
    )


def dump_config(cfg: dict, header: list[str]) -> str:
    lines = [f"# {h}" for h in header]
    return "\n".join(lines) + "\n" + yaml.safe_dump(cfg, sort_keys=False)
