"""Key maps of the real large architectures, checked on meta tensors (no weights allocated)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_ext.convert.meta_check import check_key_map
from megatron_ext.models import get_family, get_preset


@pytest.mark.parametrize("preset", ["bloom-176b", "fingpt-13b"])
@pytest.mark.parametrize(("tp", "pp"), [(4, 12), (8, 8)])
def test_large_key_maps_at_training_layouts(preset, tp, pp):
    config = get_preset(preset)
    report = check_key_map(get_family(config.family), config, tp, pp)
    assert report.problems == []
    per_layer = 12  # BLOOM block: 2 norms, qkv, dense, h_to_4h, 4h_to_h (weight + bias each)
    # + word embeddings, embedding LN w/b, ln_f w/b, lm_head (tied alias: no shard of its own)
    assert report.num_hf_tensors == per_layer * config.num_layers + 6
    assert report.num_files == (config.num_layers + 2) * tp
    assert report.num_shard_tensors == (per_layer * config.num_layers + 5) * tp
    assert len(report.stage_layers) == pp


def test_gqa_key_map_with_replicated_kv_heads():
    config = get_preset("llama-2-70b")  # 8 kv heads; tp=16 replicates each over 2 ranks
    report = check_key_map(get_family("llama"), config.replace(num_layers=2), 16, 2)
    assert report.problems == []


def test_a_broken_key_map_is_reported():
    config = get_preset("tiny")
    family = get_family("bloom")
    broken = dataclasses.replace(
        family, key_map=tuple(e for e in family.key_map if "dense_4h_to_h.bias" not in e.hf[0])
    )
    problems = "\n".join(check_key_map(broken, config, 2, 2).problems)
    assert "dense_4h_to_h.bias is read by 0" in problems
    assert "parameter names differ" in problems
