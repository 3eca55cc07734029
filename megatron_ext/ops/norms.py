"""LayerNorm and RMSNorm over the last dimension, fused forward and backward.

Shapes: x [..., h], weight and bias [h]. Statistics and arithmetic are fp32; the output is in
x.dtype and the parameter gradients in the parameters' dtype (fp32 or x.dtype). The fused
backward saves x and the per-row fp32 statistics, as Apex/Megatron's fused norms do.
No collective runs in forward or backward (sequence-parallel reductions of the weight gradients
belong to the caller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from megatron_ext.ops._backend import compute_dtype, kernels_for


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Plain PyTorch version of `layer_norm`."""
    acc = compute_dtype(x)
    b = bias.to(acc) if bias is not None else None
    return F.layer_norm(x.to(acc), (x.shape[-1],), weight.to(acc), b, eps).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain PyTorch version of `rms_norm`: x / sqrt(mean(x^2) + eps) * weight."""
    acc = compute_dtype(x)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def _check(name: str, x: torch.Tensor, param: torch.Tensor | None, what: str) -> None:
    if param is not None and (param.dim() != 1 or param.numel() != x.shape[-1]):
        raise ValueError(f"{name}: {what} must be [{x.shape[-1]}], got {tuple(param.shape)}")


class _FusedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, kernels):
        w32 = weight.detach().float().contiguous()
        b32 = bias.detach().float().contiguous() if bias is not None else None
        y, mean, rstd = kernels.layer_norm_fwd(x, w32, b32, eps)
        ctx.save_for_backward(x, w32, mean, rstd)
        ctx.kernels, ctx.w_dtype = kernels, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w32, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = ctx.kernels.layer_norm_bwd(grad_y, x, w32, mean, rstd)
        grad_b = grad_b.to(ctx.b_dtype) if ctx.b_dtype is not None else None
        return grad_x, grad_w.to(ctx.w_dtype), grad_b, None, None


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, kernels):
        w32 = weight.detach().float().contiguous()
        y, rstd = kernels.rms_norm_fwd(x, w32, eps)
        ctx.save_for_backward(x, w32, rstd)
        ctx.kernels, ctx.w_dtype = kernels, weight.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w32, rstd = ctx.saved_tensors
        grad_x, grad_w = ctx.kernels.rms_norm_bwd(grad_y, x, w32, rstd)
        return grad_x, grad_w.to(ctx.w_dtype), None, None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    use_fused: bool | None = None,
) -> torch.Tensor:
    """LayerNorm of x [..., h] with weight [h] and bias [h] (or None).

    use_fused: None follows `set_use_fused`; False runs the reference.
    """
    _check("layer_norm", x, weight, "weight")
    _check("layer_norm", x, bias, "bias")
    kernels = kernels_for(x, use_fused)
    if kernels is None:
        return layer_norm_reference(x, weight, bias, eps)
    return _FusedLayerNorm.apply(x, weight, bias, float(eps), kernels)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_fused: bool | None = None
) -> torch.Tensor:
    """RMSNorm of x [..., h] with weight [h] (Llama / Megatron convention).

    use_fused: None follows `set_use_fused`; False runs the reference.
    """
    _check("rms_norm", x, weight, "weight")
    kernels = kernels_for(x, use_fused)
    if kernels is None:
        return rms_norm_reference(x, weight, eps)
    return _FusedRMSNorm.apply(x, weight, float(eps), kernels)
