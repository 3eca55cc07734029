"""The core attention backends agree (softmax, sdpa, flex; ALiBi, GQA, padding, odd head
dims), keep one ALiBi convention in bf16, stay finite in fp16, and `auto` picks as documented.
FlexAttention has no CPU backward: flex is compared in forward here, in backward on a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.models.attention import alibi_slopes
from megatron_ext.models.core_attention import (
    core_attention,
    flex_head_dim,
    relative_alibi_bias,
    resolve_backend,
)

BACKENDS = ["softmax", "sdpa", "flex"]


def reference(q, k, v, slopes=None, padding_mask=None):
    """fp64 softmax(q kᵀ/√hn + slope·(j − i)) v, causal, padded keys masked; [b, np, s, hn]."""
    q, k, v = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if slopes is not None:
        scores = scores + relative_alibi_bias(slopes, s).double()
    masked = torch.ones(s, s, dtype=torch.bool).triu(1)
    if padding_mask is not None:
        masked = masked | padding_mask
    return torch.softmax(scores.masked_fill(masked, float("-inf")), -1) @ v


def qkv(b, np_, nkv, s, hn, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, np_, s, hn, generator=g)
    k, v = (torch.randn(b, nkv, s, hn, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("np_, nkv, hn", [(4, 4, 16), (4, 2, 12), (6, 1, 8)])
def test_backends_agree_with_fp64_in_fp32(backend, alibi, np_, nkv, hn):
    q, k, v = qkv(2, np_, nkv, 24, hn)
    slopes = alibi_slopes(np_) if alibi else None
    out = core_attention(q, k, v, backend=backend, alibi_slopes=slopes)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(q, k, v, slopes), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_mask_agrees(backend):
    q, k, v = qkv(2, 4, 2, 16, 8)
    padding = torch.zeros(2, 1, 1, 16, dtype=torch.bool)
    padding[0, ..., :5] = True  # left padding of the first sequence
    slopes = alibi_slopes(4)
    out = core_attention(q, k, v, backend=backend, alibi_slopes=slopes, padding_mask=padding)
    want = reference(q, k, v, slopes, padding).nan_to_num(0.0)  # fully masked rows: zeros
    live = ~padding[:, 0, 0, :].unsqueeze(1).unsqueeze(-1).expand_as(out)  # rows with a key
    torch.testing.assert_close(out.double()[live], want[live], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_in_bf16_at_2048_stays_within_bf16_tolerance(backend):
    """BLOOM's absolute bias slope·j cast to bf16 was off by about one logit near position 2047
    (the old sdpa path: output error 1.07 here); the relative bias errs like the scores do."""
    q, k, v = qkv(1, 4, 4, 2048, 16, torch.bfloat16)
    slopes = alibi_slopes(4)
    out = core_attention(q, k, v, backend=backend, alibi_slopes=slopes)
    err = (out.double() - reference(q, k, v, slopes)).abs().max().item()
    assert err < 0.03, err


@pytest.mark.parametrize("backend", ["softmax", "sdpa"])
def test_fp16_scores_do_not_overflow(backend):
    """q·k = 64 · 40² = 102400 > fp16's 65504 unscaled; scaling q first keeps it 12800."""
    q = torch.full((1, 2, 8, 64), 40.0, dtype=torch.float16)
    out = core_attention(q, q, q, backend=backend, alibi_slopes=alibi_slopes(2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), q.float())  # equal keys: the mean of equal values


def test_gradients_of_softmax_and_sdpa_agree_with_gqa_and_alibi():
    grads = {}
    for backend in ("softmax", "sdpa"):
        q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 20, 8))
        out = core_attention(q, k, v, backend=backend, alibi_slopes=alibi_slopes(4))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[backend] = [t.grad for t in (q, k, v)]
    for a, b in zip(grads["softmax"], grads["sdpa"], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_flex_pads_head_dims_the_kernels_refuse():
    assert [flex_head_dim(d) for d in (128, 96, 86, 80, 64, 8)] == [128, 128, 128, 128, 64, 16]


def test_auto_picks_per_device_and_position_embedding(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.version, "hip", None)
    assert resolve_backend("auto", cuda, "alibi", 0.0) == "flex"
    assert resolve_backend("auto", cuda, "rope", 0.0) == "sdpa"
    assert resolve_backend("auto", cuda, "alibi", 0.1) == "softmax"  # flex has no dropout
    assert resolve_backend("auto", cpu, "rope", 0.0) == "softmax"
    assert resolve_backend("sdpa", cpu, "alibi", 0.0) == "sdpa"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert resolve_backend("auto", cuda, "alibi", 0.0) == "softmax"


def test_flex_with_attention_dropout_is_refused():
    from megatron_ext.errors import UserError
    from megatron_ext.models.config import ModelConfig

    with pytest.raises(UserError, match="flex has no attention dropout"):
        ModelConfig(attention_backend="flex", attention_dropout=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hn", [86, 80, 128])
def test_backends_forward_and_gradients_against_fp64_on_gpu(backend, hn):
    """bf16 at s = 2048 with ALiBi and GQA: output and q/k/v gradients within bf16 tolerance of
    an fp64 reference on the same bf16 inputs (flex compiled, head dims padded)."""
    q, k, v = (t.cuda().requires_grad_() for t in qkv(1, 8, 4, 2048, hn, torch.bfloat16))
    slopes = alibi_slopes(8).cuda()
    out = core_attention(q, k, v, backend=backend, alibi_slopes=slopes)
    weight = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    (out.float() * weight).sum().backward()
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = reference(*refs, slopes.cpu().cuda())
    (want * weight.double()).sum().backward()
    assert (out.double() - want).abs().max().item() < 0.03
    for got, ref in zip((q, k, v), refs, strict=True):
        scale = ref.grad.abs().max().item()
        assert (got.grad.double() - ref.grad).abs().max().item() < 0.03 * scale
