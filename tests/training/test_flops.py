"""Throughput accounting: FLOPs per token against Megatron's closed form, recomputation,
the device peak table and the MFU of a step."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.presets import get_preset
from megatron_ext.training import flops


def test_bloom_flops_equal_megatrons_formula():
    m = get_preset("fingpt-3b")
    s, h, L, V = 2048, m.hidden_size, m.num_layers, m.padded_vocab_size(1)
    megatron = 72 * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    assert flops.model_flops_per_token(m, s) == pytest.approx(megatron, rel=1e-12)
    # full recomputation: 4 passes over the blocks (Megatron's 96 L h² (1 + s/6h)), 3 on logits
    hw = 96 * L * h**2 * (1 + s / (6 * h)) + 6 * V * h
    assert flops.hardware_flops_per_token(m, s, "full") == pytest.approx(hw, rel=1e-12)
    assert flops.hardware_flops_per_token(m, s, "none") == flops.model_flops_per_token(m, s)
    # selective recompute repeats only the attention core: between none and full
    sel = flops.hardware_flops_per_token(m, s, "selective")
    core = m.num_layers * 4 * s * m.num_attention_heads * m.head_dim
    assert sel == pytest.approx(flops.model_flops_per_token(m, s) + core, rel=1e-12)
    assert flops.model_flops_per_token(m, s) < sel < flops.hardware_flops_per_token(m, s, "full")


def test_gqa_and_swiglu_count_their_own_matrices():
    m = ModelConfig(
        hidden_size=64, num_attention_heads=8, num_kv_heads=2, activation="swiglu",
        ffn_hidden_size=160, position_embedding="rope", vocab_size=256,
    )  # fmt: skip
    hn = 8
    block = 2 * 64 * (8 + 4) * hn + 2 * 64 * 64 + 2 * 64 * 160 * 2 + 2 * 160 * 64 + 4 * 32 * 64
    assert flops.block_forward_flops(m, 32) == block


def test_peak_by_device_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("AMD Instinct MI250X", 191.5),
        ("Tesla V100", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert flops.peak_tflops(cuda) == peak, name
    assert flops.peak_tflops(cuda, override=400.0) == 400.0
    assert flops.peak_tflops(torch.device("cpu")) is None


def test_step_throughput_and_mfu():
    # 6e9 FLOPs x 1000 tokens / 2 s / 2 devices = 1.5 TFLOP/s per device
    got = flops.throughput((6e9, 8e9), tokens=1000, seconds=2.0, devices=2, peak=3.0)
    assert got["tflops_per_device"] == pytest.approx(1.5)
    assert got["hw_tflops_per_device"] == pytest.approx(2.0)
    assert got["mfu"] == pytest.approx(0.5) and got["hfu"] == pytest.approx(2 / 3)
    assert flops.throughput((1.0, 1.0), 1, 1.0, 1, None)["mfu"] is None
