"""A random Hugging Face checkpoint of any model config, written one tensor at a time: the input
of the conversion benchmark and of the conversion memory test (no hub downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_ext.convert import driver
from megatron_ext.convert.safetensors_io import (
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
)
from megatron_ext.convert.shapes import expected_shard_shapes
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.presets import get_family


def write_synthetic_hf(
    out: Path, config: ModelConfig, seed: int = 0, max_shard_bytes: int = 10**9
) -> None:
    """OUT: safetensors shards (with an index) of N(0, 0.02) fp32 weights in HF names and shapes
    for CONFIG, and its config.json. Memory: one tensor at a time. OUT must not exist."""
    family = get_family(config.family)
    ours = expected_shard_shapes(config, 1)  # our tp=1 shapes, from meta tensors
    specs = driver.hf_specs_from_shards(
        lambda r, n: TensorSpec(n, torch.float32, ours[n]), family, config, 1
    )
    gen = torch.Generator().manual_seed(seed)
    with atomic_output_dir(out) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_bytes)
        for spec in specs:
            writer.write(spec.name, torch.randn(spec.shape, generator=gen) * 0.02)
        writer.finish()
        hf_config = {"model_type": config.family, **family.to_hf_config(config)}
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
