"""Selective activation recomputation: the attention core runs again in backward (and only
there), with the same gradients; the planner counts its activations without the scores."""

from __future__ import annotations

import torch

from megatron_ext.models import attention
from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel.context import ParallelContext


def _grads(recompute: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    calls = [0]
    real = attention.core_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "core_attention", counting)
    torch.manual_seed(0)
    config = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64,
                         seq_length=16, attention_dropout=0.1)  # fmt: skip
    ctx = ParallelContext.from_sizes(1, 1, 1)
    ctx.seed(7)
    layer = attention.SelfAttention(config, ctx)
    layer.recompute_core = recompute
    x = torch.randn(16, 2, 32, requires_grad=True)
    layer(x).square().sum().backward()
    return [x.grad, *(p.grad for p in layer.parameters())], calls[0]


def test_selective_recompute_runs_the_core_again_with_the_same_gradients(monkeypatch):
    plain, plain_calls = _grads(False, monkeypatch)
    selective, selective_calls = _grads(True, monkeypatch)
    assert (plain_calls, selective_calls) == (1, 2)  # recomputed once, in backward
    for a, b in zip(plain, selective, strict=True):
        assert torch.equal(a, b)  # dropout masks replayed from the tracker


def test_planner_counts_selective_activations_without_the_scores():
    from megatron_ext.models.presets import resolve_model_config
    from megatron_ext.planner.memory import Layout, estimate_memory

    model = resolve_model_config("bloom-176b")
    est = {
        mode: estimate_memory(model, Layout(4, 12, 8, 2, mode), 2048, 2048, "bf16")
        for mode in ("none", "selective", "full")
    }
    assert est["full"].activations < est["selective"].activations < est["none"].activations
    assert est["selective"].activations == est["selective"].activations_selective_recompute
    # what it drops: a s^2 b / t elements (the softmax output) per layer and micro-batch in flight
    from megatron_ext.planner.memory import estimate_stages, stage_layers

    stage0 = estimate_stages(model, Layout(4, 12, 8, 2, "selective"), 2048, 2048, "bf16")[0]
    scores = 112 * 2048 * 2048 * 2 // 4 * 2  # bf16
    in_flight, layers = 12, stage_layers(70, 12)[0]
    dropped = stage0.activations_no_recompute - stage0.activations_selective_recompute
    assert dropped == in_flight * layers * scores
