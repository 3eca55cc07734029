"""Bias + GeLU fused: y = gelu(x + bias), as Megatron's `bias_gelu_impl` (BLOOM MLP).

Shapes: x [..., h], bias [h]. `approximate="tanh"` (default, BLOOM/Megatron) or "none" (exact
erf). Computed in fp32, returned in x.dtype; the bias gradient is returned in bias.dtype.
No collective runs in forward or backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_ext.ops._backend import compute_dtype, kernels_for

_APPROXIMATIONS = ("tanh", "none")


def bias_gelu_reference(
    x: torch.Tensor, bias: torch.Tensor, approximate: str = "tanh"
) -> torch.Tensor:
    """Plain PyTorch version of `bias_gelu`."""
    acc = compute_dtype(x)
    return F.gelu(x.to(acc) + bias.to(acc), approximate=approximate).to(x.dtype)


class _FusedBiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, tanh, kernels):
        bias32 = bias.detach().float().contiguous()
        ctx.save_for_backward(x, bias32)
        ctx.tanh, ctx.kernels, ctx.bias_dtype = tanh, kernels, bias.dtype
        return kernels.bias_gelu_fwd(x, bias32, tanh)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, bias32 = ctx.saved_tensors
        grad_x, grad_bias = ctx.kernels.bias_gelu_bwd(grad_y, x, bias32, ctx.tanh)
        return grad_x, grad_bias.to(ctx.bias_dtype), None, None


def bias_gelu(
    x: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "tanh",
    *,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """gelu(x + bias) over x [..., h] with bias [h]; recomputes x + bias in backward.

    use_fused: None follows `set_use_fused`; False runs the reference.
    """
    if approximate not in _APPROXIMATIONS:
        raise ValueError(
            f"bias_gelu: approximate must be one of {_APPROXIMATIONS}, got {approximate!r}"
        )
    if bias.dim() != 1 or bias.numel() != x.shape[-1]:
        raise ValueError(f"bias_gelu: bias must be [{x.shape[-1]}], got {tuple(bias.shape)}")
    kernels = kernels_for(x, use_fused)
    if kernels is None:
        return bias_gelu_reference(x, bias, approximate)
    return _FusedBiasGelu.apply(x, bias, approximate == "tanh", kernels)
