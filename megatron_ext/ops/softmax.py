"""Scaled softmax with causal mask, ALiBi bias and padding mask fused (BLOOM attention).

Shapes: scores and probabilities [b, np, sq, sk] (np = attention heads on this rank),
alibi_slopes [np], padding_mask [b|1, 1, 1|sq, sk].

    probs = softmax(scale * scores + slopes[h] * j, masked keys -> -inf)   over the key axis j

The bias is BLOOM's `slope * key_position`; softmax is shift-invariant per row, so it equals
the `slope * (j - i)` form. Causal masking is bottom-right aligned: query i sees keys
j <= i + (sk - sq), which is the usual lower triangle when sq == sk and keeps a KV cache right
when sq < sk. A row whose keys are all masked gives zeros (not NaN, not a uniform row), and its
gradient is zero. No collective runs in forward or backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from megatron_ext.ops._backend import compute_dtype, kernels_for


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(sq, device=device).view(sq, 1)
    j = torch.arange(sk, device=device).view(1, sk)
    return (j > i + (sk - sq)).view(1, 1, sq, sk)


def scaled_alibi_softmax_reference(
    scores: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    causal: bool = True,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch version of `scaled_alibi_softmax`; fp32 inside, output in scores.dtype."""
    b, np_, sq, sk = scores.shape
    acc = compute_dtype(scores)
    x = scores.to(acc) * scale
    if alibi_slopes is not None:
        pos = torch.arange(sk, device=scores.device, dtype=acc)
        x = x + alibi_slopes.detach().to(scores.device, acc).view(1, np_, 1, 1) * pos
    mask = _causal_mask(sq, sk, scores.device) if causal else None
    if padding_mask is not None:
        mask = padding_mask if mask is None else mask | padding_mask
    if mask is None:
        return torch.softmax(x, dim=-1).to(scores.dtype)
    # Fully masked rows would be NaN (all -inf): give them finite logits, then zero them.
    dead = mask.all(dim=-1, keepdim=True)
    x = x.masked_fill(mask, float("-inf")).masked_fill(dead, 0.0)
    return torch.softmax(x, dim=-1).masked_fill(dead, 0.0).to(scores.dtype)


class _FusedScaledAlibiSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale, slopes, causal, padding_mask, kernels):
        probs = kernels.softmax_fwd(scores, scale, slopes, causal, padding_mask)
        ctx.save_for_backward(probs)
        ctx.scale, ctx.causal, ctx.kernels = scale, causal, kernels
        return probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        grad = ctx.kernels.softmax_bwd(grad_probs, probs, ctx.scale, ctx.causal)
        return grad, None, None, None, None, None


def scaled_alibi_softmax(
    scores: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None,
    causal: bool = True,
    padding_mask: torch.Tensor | None = None,
    *,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """softmax(scale * scores + ALiBi bias) with causal and padding masks, in one pass.

    scores: [b, np, sq, sk], fp32/bf16/fp16; computed in fp32, returned in scores.dtype.
    alibi_slopes: [np] (this rank's heads), or None for no bias; treated as constants
    (no gradient). padding_mask: bool [b|1, 1, 1|sq, sk], True = masked, or None.
    use_fused: None follows `set_use_fused`; False runs the reference.
    The fused backward saves only the probabilities (in scores.dtype).
    """
    if scores.dim() != 4:
        raise ValueError(
            f"scaled_alibi_softmax: scores must be [b, np, sq, sk], got {tuple(scores.shape)}"
        )
    kernels = kernels_for(scores, use_fused)
    if kernels is None:
        return scaled_alibi_softmax_reference(scores, scale, alibi_slopes, causal, padding_mask)
    slopes = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().to(scores.device, torch.float32).contiguous()
    if padding_mask is not None:
        padding_mask = padding_mask.to(scores.device, torch.bool)
    return _FusedScaledAlibiSoftmax.apply(
        scores, float(scale), slopes, bool(causal), padding_mask, kernels
    )
