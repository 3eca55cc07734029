"""Backend choice: the use_fused switch, fused_ops_status, and the fallback with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_ext import ops
from megatron_ext.ops import _backend
from tests.ops.parity import require_kernels


@pytest.fixture
def restore_switch():
    before = ops.get_use_fused()
    yield
    ops.set_use_fused(before)


def _call_every_op(x4: torch.Tensor) -> list[torch.Tensor]:
    h = x4.shape[-1]
    w = torch.ones(h)
    cos, sin = torch.ones(x4.shape[0], 1, 1, h), torch.zeros(x4.shape[0], 1, 1, h)
    return [
        ops.scaled_alibi_softmax(x4, 0.5, torch.ones(x4.shape[1]), True, None),
        ops.bias_gelu(x4, torch.zeros(h)),
        ops.layer_norm(x4, w, torch.zeros(h), 1e-5),
        ops.rms_norm(x4, w, 1e-6),
        ops.apply_rotary(x4, cos, sin),
    ]


def _references(x4: torch.Tensor) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ops.set_use_fused(False)
        try:
            return _call_every_op(x4)
        finally:
            ops.set_use_fused(True)


def test_status_names_every_op(restore_switch):
    require_kernels("cpu")
    ops.set_use_fused(True)
    status = ops.fused_ops_status()
    assert set(status) == set(_backend.OPS)
    assert all(s["cpu"] == "cpu" for s in status.values())
    gpu = {s["gpu"] for s in status.values()}
    assert gpu <= {"cuda", "hip", "reference"} and len(gpu) == 1
    ops.set_use_fused(False)
    assert all(
        s == {"cpu": "reference", "gpu": "reference"} for s in ops.fused_ops_status().values()
    )


def test_missing_build_falls_back_with_one_warning(monkeypatch, restore_switch):
    ops.set_use_fused(True)
    monkeypatch.setitem(_backend._loaded, "cpu", None)
    monkeypatch.setitem(_backend._errors, "cpu", "No module named 'megatron_ext._ops_cpu'")
    monkeypatch.setattr(_backend, "_warned", set())
    x4 = torch.randn(3, 2, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = _call_every_op(x4) + _call_every_op(x4)
    ours = [w for w in caught if "megatron_ext._ops_cpu is not built" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "pip install --no-build-isolation -e ." in str(ours[0].message)
    assert ops.fused_ops_status()["layer_norm"]["cpu"] == "reference"
    for got, want in zip(outs, _references(x4) * 2, strict=True):
        assert torch.equal(got, want)


def test_per_call_switch_overrides_global(restore_switch):
    require_kernels("cpu")
    ops.set_use_fused(False)
    x = torch.randn(4, 9)
    # The fused path is picked per call even though the process default is the reference.
    y = ops.bias_gelu(x.requires_grad_(), torch.zeros(9), use_fused=True)
    assert type(y.grad_fn).__name__.startswith("_FusedBiasGeluBackward")
    y = ops.bias_gelu(x, torch.zeros(9))
    assert not type(y.grad_fn).__name__.startswith("_Fused")


def test_float64_runs_the_reference_without_warning(restore_switch):
    ops.set_use_fused(True)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ops.scaled_alibi_softmax(x, 1.0, None)
    assert y.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: ops.scaled_alibi_softmax(t, 0.7, None), (x,))
