"""scaled_alibi_softmax: fused kernels vs the PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.ops import scaled_alibi_softmax, scaled_alibi_softmax_reference
from tests.ops.parity import DEVICES, DTYPE_IDS, DTYPES, assert_parity, require_kernels


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """BLOOM's slopes for a power-of-two head count (enough for tests)."""
    start = 2.0 ** (-(2.0 ** -(math.log2(num_heads) - 3)))
    return torch.tensor([start ** (i + 1) for i in range(num_heads)], dtype=torch.float32)


def padding(kind: str | None, b: int, sq: int, sk: int, gen: torch.Generator):
    if kind is None:
        return None
    if kind == "keys":  # [b, 1, 1, sk]: padded keys at the end of each sequence
        lengths = torch.randint(1, sk + 1, (b,), generator=gen)
        return (torch.arange(sk).view(1, sk) >= lengths.view(b, 1)).view(b, 1, 1, sk)
    mask = torch.rand(b, 1, sq, sk, generator=gen) < 0.3  # [b, 1, sq, sk], some rows all masked
    mask[:, :, 0, :] = True
    return mask


# (b, np, sq, sk, causal, alibi, padding): seq 1 .. 4096, odd lengths (not multiples of any
# vector width), sq > sk (causal rows with no visible key), sq < sk (KV cache).
CASES = [
    (1, 1, 1, 1, True, True, None),
    (2, 4, 7, 7, True, True, "keys"),
    (2, 2, 129, 129, True, True, None),
    (1, 2, 33, 129, True, False, "full"),
    (2, 2, 17, 5, True, True, None),
    (1, 2, 7, 1000, False, True, "keys"),
    (2, 1, 31, 31, False, False, None),
    (1, 2, 64, 4096, True, True, "keys"),
]
# The full 4096 x 4096 square in fp32 only (CI time); bf16/fp16 see sk = 4096 above.
PARAMS = [(case, dtype) for case in CASES for dtype in DTYPES]
PARAMS.append(((1, 1, 4096, 4096, True, True, None), torch.float32))


def _param_id(param) -> str:
    case, dtype = param
    name = DTYPE_IDS[DTYPES.index(dtype)]
    return "b{}h{}q{}k{}_c{:d}a{:d}_{}".format(*case) + f"-{name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param", PARAMS, ids=_param_id)
def test_parity(device, param):
    require_kernels(device)
    (b, np_, sq, sk, causal, alibi, pad_kind), dtype = param
    gen = torch.Generator().manual_seed(sq * 1000 + sk)
    scores = (4 * torch.randn(b, np_, sq, sk, generator=gen)).to(device, dtype).requires_grad_()
    slopes = alibi_slopes(4)[:np_].to(device) if alibi else None
    pad = padding(pad_kind, b, sq, sk, gen)
    pad = pad.to(device) if pad is not None else None
    scale = 1 / math.sqrt(64)

    def fused(x):
        return scaled_alibi_softmax(x, scale, slopes, causal, pad, use_fused=True)

    def reference(x):
        return scaled_alibi_softmax_reference(x, scale, slopes, causal, pad)

    assert_parity(fused, reference, [scores], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "reference"])
def test_fully_masked_rows_are_zero(device, use_fused):
    if use_fused:
        require_kernels(device)
    scores = torch.randn(2, 2, 5, 3, device=device, requires_grad=True)
    pad = torch.zeros(2, 1, 5, 3, dtype=torch.bool, device=device)
    pad[1, :, 2, :] = True  # batch 1, query 2 sees nothing
    probs = scaled_alibi_softmax(scores, 0.5, None, True, pad, use_fused=use_fused)
    probs.sum().backward()
    # causal with sq=5 > sk=3: queries 0 and 1 see no key (bottom-right alignment).
    assert torch.equal(probs[:, :, :2], torch.zeros_like(probs[:, :, :2]))
    assert torch.equal(probs[1, :, 2], torch.zeros_like(probs[1, :, 2]))
    torch.testing.assert_close(probs[0, :, 2:].sum(-1), torch.ones(2, 3, device=device))
    assert torch.isfinite(scores.grad).all()
    assert torch.equal(scores.grad[:, :, :2], torch.zeros_like(scores.grad[:, :, :2]))


def test_alibi_bias_is_shift_invariant():
    """BLOOM's slope * j equals slope * (j - i) under softmax (the documented convention)."""
    b, np_, s = 1, 4, 9
    scores = torch.randn(b, np_, s, s, dtype=torch.float64)
    slopes = alibi_slopes(np_).double()
    pos = torch.arange(s, dtype=torch.float64)
    rel = (pos.view(1, s) - pos.view(s, 1)).view(1, 1, s, s) * slopes.view(1, np_, 1, 1)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    expected = torch.softmax((scores + rel).masked_fill(causal, float("-inf")), dim=-1)
    got = scaled_alibi_softmax_reference(scores, 1.0, slopes, causal=True)
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_and_broadcast_mask(device):
    require_kernels(device)
    base = torch.randn(2, 3, 40, 40, device=device)
    scores = base.transpose(2, 3)  # not contiguous
    pad = torch.zeros(1, 1, 1, 40, dtype=torch.bool, device=device)
    pad[..., 35:] = True  # one mask for every batch
    slopes = alibi_slopes(4)[:3].to(device)
    fused = scaled_alibi_softmax(scores, 0.3, slopes, True, pad, use_fused=True)
    ref = scaled_alibi_softmax_reference(scores, 0.3, slopes, True, pad)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
