"""Shared fixtures. Tiers: unit (default), distributed, slurm, gpu (skipped without a GPU)."""

from __future__ import annotations

import pytest


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA/ROCm GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
