"""Trainer checkpoints (what `megatron-ext train` saves) as conversion sources and targets.

Reading: a checkpoint root (its `latest`, or iteration N) -> `TrainerCheckpoint`: the tag
directory, the saved run config, the model config, (tp, pp) and the training facts
(iteration, consumed samples). The weights are read lazily through layout.py.

Writing: our per-layer shards plus exactly the files that DeepSpeed's
`PipelineEngine.load_checkpoint(load_module_only=True)` and our checkpointing.load read:

    <root>/latest                                  the tag
    <root>/<tag>/layer_XX-model_YY-model_states.pt  one per (pipeline layer, tp rank), layout.py
    <root>/<tag>/mp_rank_MM_model_states.pt        MM = pp_rank * tp + tp_rank (DeepSpeed's
                                                    model-parallel rank): {"module": None, ...};
                                                    None makes the pipeline engine read the
                                                    layer files; dp_world_size etc. as DeepSpeed
                                                    reads them, and our client state
    <root>/<tag>/config.yaml                       model, parallel (tp, pp), data.seq_length
    <root>/<tag>/manifest.json                     names + sizes, as checkpointing.verify checks

No optimizer state is written: such a checkpoint is loaded with `train --reset-progress
checkpoint.load=<root>` (continued pretraining). Output is written to a temp directory and
renamed on success.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint_format import mp_rank_file
from megatron_ext.convert import layout
from megatron_ext.convert.safetensors_io import atomic_output_dir
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import SPLITS, ModelFamily
from megatron_ext.models.presets import get_family

log = get_logger(__name__)

Shards = Iterable[tuple[layout.PipeLayer, int, dict[str, torch.Tensor]]]


@dataclass
class TrainerCheckpoint:
    tag_dir: Path
    run_config: dict
    config: ModelConfig
    family: ModelFamily
    tp_size: int
    pp_size: int
    iteration: int | None
    consumed_samples: int | None

    @property
    def reader(self) -> layout.PipelineCheckpointReader:
        return layout.PipelineCheckpointReader(self.tag_dir, self.config)

    def facts(self) -> dict:
        """Training facts for the model card (None where the checkpoint does not say)."""
        data = self.run_config.get("data") or {}
        train = self.run_config.get("train") or {}
        tokens = None
        if self.consumed_samples is not None:
            tokens = self.consumed_samples * self.config.seq_length
        return {
            "iterations": self.iteration,
            "consumed samples": self.consumed_samples,
            "tokens seen": tokens,
            "data": data.get("path") or data.get("blend"),
            "sequence length": self.config.seq_length,
            "precision": train.get("precision"),
            "global batch size": train.get("global_batch_size"),
            "layout": f"tp={self.tp_size} pp={self.pp_size}",
            "checkpoint": str(self.tag_dir),
        }


def _client_state(tag_dir: Path) -> dict:
    """Our client state from mp_rank_00 (weights-only unpickling; {} when absent/refused)."""
    from megatron_ext.checkpoint_format import CheckpointRefused, load_file

    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        return {}
    try:
        state = load_file(path, None, map_location="cpu")
    except (CheckpointRefused, RuntimeError) as exc:
        log.warning("%s: training facts not read (%s)", path, str(exc).splitlines()[0][:300])
        return {}
    return state if isinstance(state, dict) else {}


def open_checkpoint(path: str | Path, iteration: int | None = None) -> TrainerCheckpoint:
    """A trainer checkpoint root (latest or `iteration`) or tag directory, checked complete."""
    from megatron_ext.checkpoint_format import TAG_RE, Manifest, verify

    tag_dir = layout.resolve_tag_dir(path, iteration)
    if (tag_dir / "manifest.json").is_file() or TAG_RE.match(tag_dir.name):
        problem = verify(tag_dir)
        if problem is not None:
            raise UserError(f"{tag_dir}: incomplete checkpoint: {problem}")
        # the files a conversion reads (the optimizer shards are not)
        manifest = Manifest(tag_dir)
        problem = manifest.check_files(
            [n for n in manifest.files if n.startswith(("layer_", "mp_rank_"))]
        )
        if problem is not None:
            raise UserError(f"{tag_dir}: not converted: {problem}")
    run_config = layout.read_run_config(tag_dir)
    where = str(tag_dir / "config.yaml")
    config = layout.model_config_of(run_config, where)
    family = get_family(config.family)
    tp_size = layout.tp_size_of(tag_dir)
    parallel = run_config.get("parallel") or {}
    if parallel.get("tp", tp_size) != tp_size:
        raise UserError(
            f"{where}: parallel.tp={parallel['tp']} but {tag_dir} has layer files for "
            f"tp={tp_size}; is config.yaml from another run?"
        )
    client = _client_state(tag_dir)
    match = TAG_RE.match(tag_dir.name)
    iteration = client.get("iteration", int(match.group(1)) if match else None)
    return TrainerCheckpoint(
        tag_dir=tag_dir,
        run_config=run_config,
        config=config,
        family=family,
        tp_size=tp_size,
        pp_size=int(parallel.get("pp", 1)),
        iteration=iteration,
        consumed_samples=client.get("consumed_samples"),
    )


def _mp_rank_state(config: ModelConfig, tp_size: int, pp_size: int) -> dict:
    from megatron_ext.checkpoint_format import universal_info

    return {
        "module": None,  # the pipeline engine reads layer_XX-model_YY files instead
        "buffer_names": [],
        "optimizer": None,
        "skipped_steps": 0,
        "global_steps": 0,
        "global_samples": 0,
        "dp_world_size": 1,
        "mp_world_size": tp_size * pp_size,
        "checkpoint_parallel_dimensions": {"pp_degree": pp_size, "tp_degree": tp_size},
        "iteration": 0,
        "consumed_samples": 0,
        "layout": {"tp": tp_size, "pp": pp_size, "dp": 1},
        "universal_checkpoint_info": universal_info(config),
    }


def write_checkpoint(
    out_root: str | Path,
    shards: Shards,
    config: ModelConfig,
    tp_size: int,
    pp_size: int,
    *,
    dtype: torch.dtype | None = None,
    tag: str = "iter_0000000",
) -> Path:
    """Write a weights-only trainer checkpoint from (layer, tp rank, our state) triples, one at
    a time (bounded memory). Returns the tag directory."""
    config.check_tp(tp_size)
    layout.stage_layers(config, pp_size)  # raises unless 1 <= pp <= num_layers
    with atomic_output_dir(out_root) as tmp:
        (tmp / tag).mkdir()
        for layer, tp_rank, state in shards:
            if dtype is not None:
                state = {k: v.to(dtype) for k, v in state.items()}
            layout.write_layer_file(tmp / tag, layer, tp_rank, state)
            del state
        mp_state = _mp_rank_state(config, tp_size, pp_size)
        for mp_rank in range(tp_size * pp_size):
            torch.save(mp_state, mp_rank_file(tmp / tag, mp_rank))
        run_config = {
            "model": config.to_dict(),
            "parallel": {"tp": tp_size, "pp": pp_size},
            "data": {"seq_length": config.seq_length},
        }
        layout.write_tag_files(tmp, tag, run_config)
    return Path(out_root) / tag


def iter_resharded(ckpt: TrainerCheckpoint, tp_size: int) -> Iterator:
    """(layer, new tp rank, our state) of `ckpt` re-split for `tp_size`: each parameter's old
    shards are merged (vocabulary padding dropped) and cut again (re-padded for the new tp)."""
    config, reader = ckpt.config, ckpt.reader
    config.check_tp(tp_size)
    for layer, entries in layout.entries_by_layer(ckpt.family, config):
        for tp_rank in range(tp_size):
            state = {}
            for entry in entries:
                split, merge = SPLITS[entry.tp_split]
                shards = [reader.get(r, entry.ours) for r in range(ckpt.tp_size)]
                full = merge(shards, config)
                del shards
                state[entry.ours] = split(full, tp_rank, tp_size, config)
                del full
            yield layer, tp_rank, state


def reshard(
    checkpoint: str | Path,
    output: str | Path,
    tp_size: int,
    pp_size: int,
    *,
    iteration: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A trainer checkpoint at any layout -> weights-only checkpoint at (tp_size, pp_size)."""
    ckpt = open_checkpoint(checkpoint, iteration)
    return write_checkpoint(
        output, iter_resharded(ckpt, tp_size), ckpt.config, tp_size, pp_size, dtype=dtype
    )


def full_state_dict(ckpt: TrainerCheckpoint, dtype: torch.dtype | None = None) -> dict:
    """Our whole model at tp=1 in memory (for `--verify` on small models and tests), with the
    weights rounded to `dtype` when given (as an export at that dtype holds them)."""
    state = {}
    for _, _, shard in iter_resharded(ckpt, 1):
        for name, tensor in shard.items():
            state[name] = tensor.to(dtype).float() if dtype is not None else tensor
    return state
