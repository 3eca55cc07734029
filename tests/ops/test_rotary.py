"""apply_rotary: fused kernels vs the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.ops import apply_rotary, apply_rotary_reference
from tests.ops.parity import DEVICES, DTYPE_IDS, DTYPES, assert_parity, require_kernels

# (s, b, np, hn, rot_dim): full and partial rotation, odd head counts, s from 1 to 4096.
SHAPES = [
    (1, 1, 1, 2, 2),
    (7, 2, 3, 64, 64),
    (5, 1, 2, 80, 32),
    (129, 3, 1, 6, 4),
    (4096, 1, 2, 64, 64),
]


def rope_tables(s: int, rot: int, dtype=torch.float32):
    """cos/sin [s, 1, 1, rot] as in HF Llama: the frequencies repeated over both halves."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    freqs = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).view(s, 1, 1, rot)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_parity(device, dtype, shape):
    require_kernels(device)
    s, b, np_, hn, rot = shape
    gen = torch.Generator().manual_seed(s)
    x = torch.randn(s, b, np_, hn, generator=gen).to(device, dtype).requires_grad_()
    cos, sin = (t.to(device) for t in rope_tables(s, rot))
    assert_parity(
        lambda t: apply_rotary(t, cos, sin, use_fused=True),
        lambda t: apply_rotary_reference(t, cos, sin),
        [x],
        dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_general_tables_and_noncontiguous_input(device):
    """cos/sin halves need not match (no assumption on the table), x may be a strided view."""
    require_kernels(device)
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(9, 2, 3, 3 * 16, generator=gen).to(device)
    q = qkv[..., :16].requires_grad_()  # strided view, as after splitting a fused QKV
    cos = torch.randn(9, 1, 1, 12, generator=gen).to(device, torch.bfloat16)
    sin = torch.randn(9, 1, 1, 12, generator=gen).to(device, torch.bfloat16)
    assert_parity(
        lambda t: apply_rotary(t, cos, sin, use_fused=True),
        lambda t: apply_rotary_reference(t, cos, sin),
        [q],
        torch.float32,
    )


def test_rejects_table_of_wrong_length():
    x = torch.zeros(8, 1, 1, 4)
    cos, sin = rope_tables(16, 4)
    with pytest.raises(ValueError, match="slice the cached table"):
        apply_rotary(x, cos, sin)
