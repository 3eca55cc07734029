"""Shared checks for the fused-op tests: fused vs reference, forward and backward."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import pytest
import torch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# Both paths compute in fp32 and round once, so forward results differ by fp32 rounding (fp32)
# or at most one output ulp (bf16/fp16). Backward passes see low-precision saved tensors in the
# fused path (as Megatron's kernels do), hence the looser tolerances.
FWD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
}
BWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

_MODULES = {"cpu": "megatron_ext._ops_cpu", "cuda": "megatron_ext._ops_cuda"}


def require_kernels(device: str) -> None:
    """Fail (not skip) when the kernels for `device` are not built: parity would test nothing."""
    if os.environ.get("MEGATRON_EXT_SKIP_TORCH_EXT") == "1":
        pytest.skip("MEGATRON_EXT_SKIP_TORCH_EXT=1: fused kernels not built")
    try:
        importlib.import_module(_MODULES[device])
    except ImportError as exc:
        pytest.fail(
            f"{_MODULES[device]} is not built ({exc}); run `python setup.py build_ext --inplace` "
            "or `pip install --no-build-isolation -e .` first"
        )


def assert_parity(
    fused: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    seed: int = 0,
    fwd_tol: dict | None = None,
) -> None:
    """Same forward result and same gradients for every input that requires grad."""
    xs_f = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    xs_r = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out_f, out_r = fused(*xs_f), reference(*xs_r)
    assert out_f.dtype == out_r.dtype and out_f.shape == out_r.shape
    torch.testing.assert_close(out_f, out_r, **(fwd_tol or FWD_TOL[dtype]))
    wrt_f = [x for x in xs_f if x.requires_grad]
    wrt_r = [x for x in xs_r if x.requires_grad]
    if not wrt_f:
        return
    gen = torch.Generator(device="cpu").manual_seed(seed)
    grad = torch.randn(out_r.shape, generator=gen).to(out_r.device, out_r.dtype)
    grads_f = torch.autograd.grad(out_f, wrt_f, grad)
    grads_r = torch.autograd.grad(out_r, wrt_r, grad)
    for i, (gf, gr) in enumerate(zip(grads_f, grads_r, strict=True)):
        assert gf.dtype == gr.dtype and gf.shape == gr.shape, f"gradient {i}"
        scale = max(1.0, gr.float().abs().max().item())
        tol = BWD_TOL[dtype]
        torch.testing.assert_close(
            gf.float(), gr.float(), rtol=tol, atol=tol * scale, msg=lambda m, i=i: f"grad {i}: {m}"
        )
