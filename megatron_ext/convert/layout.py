"""Where our parameters live in a training checkpoint: (pipeline layer, tp rank) <-> names.

Which parameter lives in which pipeline layer (the file names, tags and manifest are
checkpoint_format.py's, shared with the trainer). It follows megatron_ext/training/pipeline.py
`layer_specs` and DeepSpeed's PipelineModule, which saves one file per (layer, tp rank) with that layer module's state dict:

    <root>/latest                     the tag, e.g. "iter_0000100"
    <root>/<tag>/config.yaml          the resolved run config (`model:` section)
    <root>/<tag>/layer_XX-model_YY-model_states.pt   XX = pipeline layer, YY = tp rank

Pipeline layers: 0 embedding ("embedding.*"), 1..L blocks ("layers.{i-1}.*"), L+1 the head
("head.*"; tied models: the final norm alone, "head.final_norm.*", and the tied logits layer
L+2 saves nothing). File names do not depend on pp: each pipeline stage saves its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint_format import (  # noqa: F401 - also used as layout.X
    layer_file,
    resolve_tag_dir,
    tag_of,
)
from megatron_ext.config import dump_yaml, read_yaml
from megatron_ext.convert.safetensors_io import TensorSpec, load_weights_only
from megatron_ext.errors import UserError
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import KeyMapEntry, ModelFamily, expand_key_map
from megatron_ext.models.presets import resolve_model_config


@dataclass(frozen=True)
class PipeLayer:
    index: int  # pipeline layer index (XX in the file name)
    prefix: str  # our parameter names in this layer start with it; file keys drop it
    name: str


def pipeline_layers(config: ModelConfig) -> list[PipeLayer]:
    """The pipeline layers that hold parameters, in order."""
    n = config.num_layers
    layers = [PipeLayer(0, "embedding.", "embedding")]
    layers += [PipeLayer(i, f"layers.{i - 1}.", f"block{i}") for i in range(1, n + 1)]
    if config.tied_embeddings:
        layers.append(PipeLayer(n + 1, "head.final_norm.", "final_norm"))
    else:
        layers.append(PipeLayer(n + 1, "head.", "head"))
    return layers


def layer_of(name: str, config: ModelConfig) -> PipeLayer:
    """The pipeline layer holding our parameter `name`."""
    if name.startswith("layers."):
        i = int(name.split(".")[1])
        return PipeLayer(i + 1, f"layers.{i}.", f"block{i + 1}")
    first = PipeLayer(0, "embedding.", "embedding")
    n = config.num_layers
    last = (
        PipeLayer(n + 1, "head.final_norm.", "final_norm")
        if config.tied_embeddings
        else PipeLayer(n + 1, "head.", "head")
    )
    for layer in (first, last):
        if name.startswith(layer.prefix):
            return layer
    raise ValueError(f"parameter {name} belongs to no pipeline layer")


def stage_layers(config: ModelConfig, pp_size: int) -> list[list[int]]:
    """Pipeline layers per pp stage: blocks spread evenly, embedding first, head last.

    This mirrors DeepSpeed's "type:PipeBlock" partition; the files do not depend on it (it
    only decides which stage holds which layer when state dicts are grouped per stage).
    """
    n = config.num_layers
    if not 1 <= pp_size <= n:
        raise UserError(f"pp={pp_size}: need 1 <= pp <= num_layers ({n})")
    bounds = [1 + (n * s) // pp_size for s in range(pp_size + 1)]
    stages = [list(range(bounds[s], bounds[s + 1])) for s in range(pp_size)]
    stages[0].insert(0, 0)
    stages[-1].append(n + 1)
    return stages


def read_run_config(tag_dir: Path) -> dict:
    path = Path(tag_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint has no saved run config")
    return read_yaml(path)


def model_config_of(run_config: dict, where: str) -> ModelConfig:
    """The model of a saved run config; seq_length from `data:` as the trainer sets it."""
    if not isinstance(run_config.get("model"), (dict, str)):
        raise UserError(f"{where}: the run config has no `model:` section")
    config = resolve_model_config(run_config["model"], where=f"{where} model")
    seq_length = (run_config.get("data") or {}).get("seq_length")
    if isinstance(seq_length, int) and seq_length > 0:
        config.seq_length = seq_length
    return config


def tp_size_of(tag_dir: Path) -> int:
    ranks = {int(p.name.split("-model_")[1][:2]) for p in tag_dir.glob("layer_00-model_*.pt")}
    if not ranks or ranks != set(range(len(ranks))):
        raise UserError(f"{tag_dir}: layer_00-model_YY files missing or not numbered 0..tp-1")
    return len(ranks)


class PipelineCheckpointReader:
    """Lazy access to our shards: `get(tp_rank, our_name)` loads one tensor (mmap, copied)."""

    def __init__(self, tag_dir: Path, config: ModelConfig) -> None:
        self.tag_dir, self.config = Path(tag_dir), config
        self._specs: dict[Path, dict[str, TensorSpec]] = {}

    def _locate(self, tp_rank: int, name: str) -> tuple[Path, str]:
        layer = layer_of(name, self.config)
        path = layer_file(self.tag_dir, layer.index, tp_rank)
        if not path.is_file():
            raise UserError(f"{path} is missing (needed for {name}); is the checkpoint complete?")
        return path, name[len(layer.prefix) :]

    def _lookup(self, state: dict, path: Path, key: str) -> torch.Tensor:
        if key not in state:
            raise UserError(f"{path} has no {key}; does config.yaml match the checkpoint?")
        return state[key]

    def get(self, tp_rank: int, name: str) -> torch.Tensor:
        path, key = self._locate(tp_rank, name)
        return self._lookup(load_weights_only(path), path, key).clone()

    def spec(self, tp_rank: int, name: str) -> TensorSpec:
        path, key = self._locate(tp_rank, name)
        if path not in self._specs:  # shapes only: the mmap'd data is never touched
            state = load_weights_only(path)
            self._specs = {
                path: {k: TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in state.items()}
            }
        return self._lookup(self._specs[path], path, key)


def write_layer_file(
    tag_dir: Path, layer: PipeLayer, tp_rank: int, state: dict[str, torch.Tensor]
) -> None:
    """Save one (layer, tp rank) state dict of ours (our names) under the file's keys."""
    # torch.save writes a view's whole storage: a dim-0 TP chunk would carry the full tensor
    local = {
        k[len(layer.prefix) :]: v.clone() if v.untyped_storage().nbytes() != v.nbytes else v
        for k, v in state.items()
    }
    torch.save(local, layer_file(tag_dir, layer.index, tp_rank))


def write_tag_files(root: Path, tag: str, run_config: dict) -> None:
    """config.yaml, manifest.json (names, sizes and checksums, as the trainer verifies) and
    `latest`."""
    from megatron_ext.checkpoint_format import write_manifest

    tag_dir = root / tag
    dump_yaml(run_config, tag_dir / "config.yaml")
    write_manifest(tag_dir)
    (root / "latest").write_text(tag)


def entries_by_layer(
    family: ModelFamily, config: ModelConfig
) -> list[tuple[PipeLayer, list[KeyMapEntry]]]:
    """The expanded key map grouped by pipeline layer, in layer order."""
    groups: dict[int, list[KeyMapEntry]] = {}
    for entry in expand_key_map(family.key_map, config):
        groups.setdefault(layer_of(entry.ours, config).index, []).append(entry)
    return [(layer, groups.get(layer.index, [])) for layer in pipeline_layers(config)]
