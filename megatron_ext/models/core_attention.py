"""Core attention backends: softmax(q kᵀ / √hn + ALiBi bias, causal and padding masks) v.

Shape legend
    b  micro-batch size      s  sequence length       hn head dim
    np query heads on this rank                        nkv key/value heads on this rank
    q [b, np, s, hn]; k, v [b, nkv, s, hn] (np a multiple of nkv: GQA); out [b, np, s, hn]

Backends (`ModelConfig.attention_backend`):
    softmax  ours: scores [b, np, s, s] materialised, the fused scaled ALiBi softmax kernel
             (CPU/CUDA/HIP, exact fp32 bias inside the kernel), kv heads repeated for GQA
    sdpa     torch's scaled_dot_product_attention (flash / memory-efficient kernels); GQA through
             `enable_gqa`; ALiBi as an additive bias slope·(j − i), formed in fp32
    flex     torch's FlexAttention (compiled Triton kernels on CUDA and ROCm): ALiBi as a score
             modification slope·(j − i) computed in fp32 inside the kernel, causal and padding
             masks as block masks, GQA through `enable_gqa`; no [s, s] tensor is kept. Head dims
             that are not a power of two (FinGPT: 96, 86, 80) are zero-padded inside the backend
             (zeros add nothing to q·k and give zero output columns, cut off again). No dropout
             (refused by the config). On CPU torch has no FlexAttention backward: forward only.
    auto     flex for ALiBi and sdpa for RoPE/learned positions on NVIDIA GPUs; on ROCm sdpa for
             RoPE/learned and our softmax kernel for ALiBi (FlexAttention's Triton kernels are
             not yet measured on MI250X); softmax on CPU; never flex with attention dropout.

All backends scale q by 1/√hn before q kᵀ (Megatron's order: an unscaled q kᵀ overflows fp16
long before the scaled one) and use one ALiBi convention, the relative slope·(j − i), which
equals BLOOM's slope·j up to a per-row shift (softmax is shift-invariant) but stays small near
the diagonal, so a bf16 bias rounds it no worse than the scores themselves. No collective runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F

from megatron_ext import ops

BACKENDS = ("auto", "softmax", "sdpa", "flex")


def resolve_backend(
    backend: str, device: torch.device, position_embedding: str, dropout: float
) -> str:
    """The backend `auto` stands for on `device` (see the module docstring); others unchanged."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "softmax"
    if position_embedding != "alibi":
        return "sdpa"
    if torch.version.hip or dropout > 0:
        return "softmax"
    return "flex"


def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str,
    alibi_slopes: torch.Tensor | None,
    padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_rng=None,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """q [b, np, s, hn], k/v [b, nkv, s, hn] -> [b, np, s, hn] in q's dtype; causal.

    alibi_slopes: fp32 [np] or None. padding_mask: bool [b, 1, 1, s], True = masked key.
    dropout_p > 0 (training): attention-probability dropout drawn inside `dropout_rng()`
    (the TP tracker's fork: heads differ per TP rank). backend: softmax | sdpa | flex."""
    if backend == "softmax":
        return _softmax_attention(q, k, v, alibi_slopes, padding_mask, dropout_p, dropout_rng,
                                  use_fused)  # fmt: skip
    if backend == "sdpa":
        return _sdpa_attention(q, k, v, alibi_slopes, padding_mask, dropout_p, dropout_rng)
    if backend == "flex":
        if dropout_p > 0:
            raise ValueError("the flex attention backend has no dropout; use softmax or sdpa")
        return flex_attention(q, k, v, alibi_slopes, padding_mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _fork(dropout_rng):
    return dropout_rng() if dropout_rng is not None else contextlib.nullcontext()


def _softmax_attention(q, k, v, slopes, padding_mask, dropout_p, dropout_rng, use_fused):
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scale first: q kᵀ stays in fp16 range
    scores = torch.matmul(q, k.transpose(-1, -2))  # [b, np, s, s]
    probs = ops.scaled_alibi_softmax(scores, 1.0, slopes, True, padding_mask, use_fused=use_fused)
    if dropout_p > 0:
        with _fork(dropout_rng):
            probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v)


def relative_alibi_bias(slopes: torch.Tensor, s: int) -> torch.Tensor:
    """fp32 [np, s, s]: slope_h · (j − i) (≤ 0 on and below the diagonal)."""
    pos = torch.arange(s, dtype=torch.float32, device=slopes.device)
    return slopes.float()[:, None, None] * (pos[None, :] - pos[:, None])


def _sdpa_attention(q, k, v, slopes, padding_mask, dropout_p, dropout_rng):
    s, hn, mask = q.shape[2], q.shape[-1], None
    if slopes is not None or padding_mask is not None:
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        if padding_mask is not None:
            allowed = allowed & ~padding_mask.to(q.device, torch.bool)
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=q.device)
        if slopes is not None:
            mask = mask + relative_alibi_bias(slopes.to(q.device), s)
        # 4-D (cuDNN takes 2-D or 4-D masks only), in q's dtype (the kernels' bias dtype:
        # rounding a relative bias costs no more than rounding the scores themselves)
        mask = mask.masked_fill(~allowed, float("-inf")).to(q.dtype)
        mask = mask.view(-1, *mask.shape[-3:]) if mask.dim() >= 3 else mask[None, None]
    gqa = q.shape[1] != k.shape[1]
    if gqa and mask is not None and torch.version.hip:
        # ROCm's memory-efficient kernel has no GQA: repeat kv rather than fall to the math path
        g = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), False
    q = q * (1.0 / math.sqrt(hn))  # scale first (fp16 range); the kernels then use scale 1
    pad = -hn % 8 if q.is_cuda else 0  # the memory-efficient kernel needs hn % 8 == 0 in bf16
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))  # zeros: same scores, cut columns
    with _fork(dropout_rng) if dropout_p > 0 else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=1.0,
            enable_gqa=gqa,
        )  # fmt: skip
    return out[..., :hn] if pad else out


def flex_head_dim(hn: int) -> int:
    """The head dim the flex kernels run at: hn, or the next power of two (at least 16)."""
    return hn if hn >= 16 and hn & (hn - 1) == 0 else max(16, 1 << (hn - 1).bit_length())


@functools.cache
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention as flex

    if device_type == "cpu":
        return _eager_quietly(flex)  # forward only on CPU; compiling takes minutes there
    # one compile per (batch, length, masks, grad mode) seen: training, evaluation and padded
    # batches add up past dynamo's default limit of 8, after which flex would run eagerly
    # (scores materialised)
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(flex, dynamic=False)


def _eager_quietly(flex):
    """Eager FlexAttention (tests, CPU) without torch's "use torch.compile" warning."""

    def run(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention.*", category=UserWarning)
            return flex(*args, **kwargs)

    return run


@functools.lru_cache(maxsize=8)
def _causal_block_mask(s: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return create_block_mask(causal, None, None, s, s, device=device)


def _padded_block_mask(padding_mask: torch.Tensor, s: int):
    from torch.nn.attention.flex_attention import create_block_mask

    masked = padding_mask.reshape(padding_mask.shape[0], -1)[:, -s:].to(torch.bool)

    def causal_unpadded(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ~masked[b, kv_idx]

    return create_block_mask(causal_unpadded, masked.shape[0], None, s, s, device=masked.device)


@functools.lru_cache(maxsize=64)
def _alibi_score_mod(slopes: torch.Tensor):
    """One score_mod per slopes tensor (the layer keeps one per device), so the compiled
    kernel is not traced again for a new closure at every call."""

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi


_warned_pad: set[int] = set()


def flex_attention(q, k, v, slopes, padding_mask) -> torch.Tensor:
    """FlexAttention with ALiBi as a score modification; see the module docstring."""
    s, hn = q.shape[2], q.shape[-1]
    run_hn = flex_head_dim(hn)
    if run_hn != hn:
        if hn not in _warned_pad:
            _warned_pad.add(hn)
            warnings.warn(
                f"flex attention: head dim {hn} is padded to {run_hn} for the kernels "
                f"({run_hn / hn - 1:.0%} more attention FLOPs)",
                RuntimeWarning,
                stacklevel=3,
            )
        q, k, v = (F.pad(t, (0, run_hn - hn)) for t in (q, k, v))
    score_mod = None if slopes is None else _alibi_score_mod(slopes.to(q.device, torch.float32))
    if padding_mask is None:
        block_mask = _causal_block_mask(s, q.device)
    else:
        block_mask = _padded_block_mask(padding_mask.to(q.device), s)
    out = _flex_fn(q.device.type)(
        q,
        k,
        v,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=1.0 / math.sqrt(hn),
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[..., :hn] if run_hn != hn else out
