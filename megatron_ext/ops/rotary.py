"""Rotary position embedding applied to queries or keys (rotate-half, non-interleaved).

Shapes (Megatron layout): x [s, b, np, hn], cos and sin [s, 1, 1, rot_dim] with rot_dim <= hn
and even. The first rot_dim features are rotated as in HF Llama / Megatron:

    out = x_rot * cos + rotate_half(x_rot) * sin,   rotate_half([x1, x2]) = [-x2, x1]

and features rot_dim.. pass through. Computed in fp32, returned in x.dtype; cos and sin are
constants (no gradient). No collective runs in forward or backward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from megatron_ext.ops._backend import compute_dtype, kernels_for


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch version of `apply_rotary`."""
    rot = cos.shape[-1]
    acc = compute_dtype(x)
    xf = x.to(acc)
    x_rot, x_pass = xf[..., :rot], xf[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos.to(acc) + torch.cat((-x2, x1), dim=-1) * sin.to(acc)
    return torch.cat((out, x_pass), dim=-1).to(x.dtype)


class _FusedRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, kernels):
        ctx.save_for_backward(cos, sin)
        ctx.kernels = kernels
        return kernels.rotary(x, cos, sin, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        return ctx.kernels.rotary(grad_out, cos, sin, True), None, None, None


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, use_fused: bool | None = None
) -> torch.Tensor:
    """Rotate the first rot_dim features of x [s, b, np, hn] by cos/sin [s, 1, 1, rot_dim].

    use_fused: None follows `set_use_fused`; False runs the reference.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [s, b, np, hn], got {tuple(x.shape)}")
    s, hn, rot = x.shape[0], x.shape[-1], cos.shape[-1]
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[0] != s or t.numel() != s * rot or t.shape[-1] != rot:
            raise ValueError(
                f"apply_rotary: {name} must be [{s}, 1, 1, rot_dim], got {tuple(t.shape)}; "
                "slice the cached table to the sequence length first"
            )
    if rot % 2 or rot > hn:
        raise ValueError(f"apply_rotary: rot_dim must be even and <= hn={hn}, got {rot}")
    kernels = kernels_for(x, use_fused)
    if kernels is None:
        return apply_rotary_reference(x, cos, sin)
    cos32 = cos.detach().to(x.device, torch.float32).reshape(s, rot).contiguous()
    sin32 = sin.detach().to(x.device, torch.float32).reshape(s, rot).contiguous()
    return _FusedRotary.apply(x, cos32, sin32, kernels)
