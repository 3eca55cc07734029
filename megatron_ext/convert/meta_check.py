"""Check a family's key map against the real HF architecture without allocating weights.

Everything runs on meta tensors: the transformers model of `config` (its real parameter names
and shapes), our model at tp=1 (shapes, TP split dims), and the driver itself
(`iter_from_hf` / `iter_to_hf`), so the check covers the code a conversion runs:

- every HF tensor is read by exactly one key-map entry (tied aliases by none);
- every (pipeline layer, tp rank) shard holds exactly our model's parameters with the shard
  shape the TP layers expect, and every layer sits in exactly one pp stage;
- merging the shards gives back every HF tensor with its shape and dtype.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from megatron_ext.convert import layout
from megatron_ext.convert.driver import hf_specs_from_shards, iter_from_hf
from megatron_ext.convert.safetensors_io import TensorSpec
from megatron_ext.convert.shapes import expected_shard_shapes
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import ModelFamily, expand_key_map


@dataclass
class MetaCheckReport:
    num_hf_tensors: int
    num_shard_tensors: int
    num_files: int  # (pipeline layer, tp rank) files
    stage_layers: list[list[int]]
    problems: list[str]


def hf_meta_specs(family: ModelFamily, config: ModelConfig) -> dict[str, TensorSpec]:
    """Names and shapes of the transformers model of `config`, built on the meta device."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(family.name, **family.to_hf_config(config))
    with torch.device("meta"):
        model = getattr(transformers, family.hf_architecture)(hf_config)
    return {k: TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}


def check_key_map(
    family: ModelFamily, config: ModelConfig, tp_size: int, pp_size: int
) -> MetaCheckReport:
    """Run every check above at (tp_size, pp_size); problems are listed, not raised."""
    hf = hf_meta_specs(family, config)
    problems: list[str] = []
    aliases = set(family.hf_tied_keys) if config.tied_embeddings else set()
    uses = Counter(k for e in expand_key_map(family.key_map, config) for k in e.hf)
    for name in hf:
        want = 0 if name in aliases else 1
        if uses[name] != want:
            problems.append(f"HF tensor {name} is read by {uses[name]} key-map entries")
    problems += [f"key map reads {k}, absent from the HF model" for k in uses if k not in hf]

    expected = expected_shard_shapes(config, tp_size)
    get_hf = lambda name: torch.empty(hf[name].shape, dtype=hf[name].dtype, device="meta")  # noqa: E731
    shards: dict[tuple[int, str], TensorSpec] = {}
    files = set()
    for layer, tp_rank, state in iter_from_hf(get_hf, family, config, tp_size):
        files.add((layer.index, tp_rank))
        if set(state) != {n for n in expected if layout.layer_of(n, config).index == layer.index}:
            problems.append(f"layer {layer.index} rank {tp_rank}: parameter names differ")
        for name, t in state.items():
            shards[(tp_rank, name)] = TensorSpec(name, t.dtype, tuple(t.shape))
            if tuple(t.shape) != expected.get(name):
                problems.append(
                    f"{name} rank {tp_rank}: shard {tuple(t.shape)}, model {expected.get(name)}"
                )
    stages = layout.stage_layers(config, pp_size)
    placed = Counter(i for s in stages for i in s)
    layer_ids = {x.index for x in layout.pipeline_layers(config)}
    if any(placed[i] != 1 for i in layer_ids) or set(placed) != layer_ids:
        problems.append(f"pp={pp_size}: layers not placed exactly once: {stages}")

    back = hf_specs_from_shards(lambda r, n: shards[(r, n)], family, config, tp_size)
    if len(back) != len({s.name for s in back}):
        problems.append("merging the shards gives some HF tensor twice")
    want = {k: v for k, v in hf.items() if k not in aliases}
    if {s.name: s for s in back} != want:
        diff = sorted(set(want.items()) ^ {(s.name, s) for s in back})[:3]
        problems.append(f"HF tensors after merging differ from the architecture, e.g. {diff}")
    return MetaCheckReport(len(hf), len(shards), len(files), stages, problems)
