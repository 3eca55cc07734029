"""layer_norm and rms_norm: fused kernels vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from tests.ops.parity import DEVICES, DTYPE_IDS, DTYPES, assert_parity, require_kernels

SHAPES = [(1, 3), (3, 7), (4, 1000), (2, 3, 4097), (129, 64)]
# h = 1 only for RMSNorm: LayerNorm of one feature is the bias, whatever x, and torch's weight
# gradient there is rounding noise (x - mean is not exactly 0 in its kernel).
RMS_SHAPES = [(1, 1), *SHAPES]


def _inputs(shape, device, dtype, param_dtype):
    gen = torch.Generator().manual_seed(shape[-1])
    h = shape[-1]
    x = (2 * torch.randn(*shape, generator=gen) + 0.5).to(device, dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(h, generator=gen)).to(device, param_dtype).requires_grad_()
    b = (0.1 * torch.randn(h, generator=gen)).to(device, param_dtype).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_parity(device, dtype, shape):
    require_kernels(device)
    x, w, b = _inputs(shape, device, dtype, dtype)
    assert_parity(
        lambda *t: layer_norm(*t, 1e-5, use_fused=True),
        lambda *t: layer_norm_reference(*t, 1e-5),
        [x, w, b],
        dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_parity(device, dtype, shape):
    require_kernels(device)
    x, w, _ = _inputs(shape, device, dtype, dtype)
    assert_parity(
        lambda *t: rms_norm(*t, 1e-6, use_fused=True),
        lambda *t: rms_norm_reference(*t, 1e-6),
        [x, w],
        dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_params_bf16_input_and_no_bias(device):
    require_kernels(device)
    x, w, b = _inputs((6, 300), device, torch.bfloat16, torch.float32)
    assert_parity(
        lambda *t: layer_norm(*t, 1e-5, use_fused=True),
        lambda *t: layer_norm_reference(*t, 1e-5),
        [x, w, b],
        torch.bfloat16,
    )
    assert_parity(
        lambda xx, ww: layer_norm(xx, ww, None, 1e-5, use_fused=True),
        lambda xx, ww: layer_norm_reference(xx, ww, None, 1e-5),
        [x, w],
        torch.bfloat16,
    )
    assert_parity(
        lambda *t: rms_norm(*t, 1e-6, use_fused=True),
        lambda *t: rms_norm_reference(*t, 1e-6),
        [x, w],
        torch.bfloat16,
    )


def test_rejects_wrong_weight_shape():
    with pytest.raises(ValueError, match="weight must be"):
        layer_norm(torch.zeros(2, 8), torch.ones(7), None, 1e-5)
