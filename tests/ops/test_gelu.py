"""bias_gelu: fused kernels vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import bias_gelu, bias_gelu_reference
from tests.ops.parity import DEVICES, DTYPE_IDS, DTYPES, assert_parity, require_kernels

SHAPES = [(1, 1), (3, 7), (5, 1000), (2, 3, 4097)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(device, dtype, approximate, shape):
    require_kernels(device)
    gen = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=gen).to(device, dtype).requires_grad_()
    # torch's own fp32 erf GeLU is up to 1.2e-6 off (see test_accuracy_against_float64).
    fwd_tol = (
        dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 and approximate == "none" else None
    )
    assert_parity(
        lambda a, b: bias_gelu(a, b, approximate, use_fused=True),
        lambda a, b: bias_gelu_reference(a, b, approximate),
        [x, bias],
        dtype,
        fwd_tol=fwd_tol,
    )


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_accuracy_against_float64(approximate):
    """The kernels' own tanh/erf/exp: within 5e-7 of float64 on [-6, 6] (torch fp32: 1.2e-6)."""
    require_kernels("cpu")
    x = torch.linspace(-6, 6, 100001)
    exact = bias_gelu_reference(
        x.double().view(1, -1), torch.zeros(x.numel(), dtype=torch.float64), approximate
    )
    got = bias_gelu(x.view(1, -1), torch.zeros(x.numel()), approximate, use_fused=True)
    assert (got.double() - exact).abs().max().item() < 5e-7


def test_fp32_bias_with_bf16_input():
    require_kernels("cpu")
    x = torch.randn(4, 33, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    assert_parity(
        lambda a, b: bias_gelu(a, b, use_fused=True), bias_gelu_reference, [x, bias], torch.bfloat16
    )


def test_tails_of_the_approximations():
    """Large |x| (tanh saturates, erf tail) and tiny |x| (no cancellation near 0)."""
    require_kernels("cpu")
    x = torch.cat(
        [torch.linspace(-30, 30, 601), torch.logspace(-8, -1, 50), -torch.logspace(-8, -1, 50)]
    )
    bias = torch.zeros(x.numel())
    for approximate in ("tanh", "none"):
        assert_parity(
            lambda a, b, ap=approximate: bias_gelu(a, b, ap, use_fused=True),
            lambda a, b, ap=approximate: bias_gelu_reference(a, b, ap),
            [x.view(1, -1).requires_grad_(), bias],
            torch.float32,
            fwd_tol=dict(rtol=1e-5, atol=2e-6),
        )


def test_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu(torch.zeros(2, 3), torch.zeros(3), approximate="sigmoid")
