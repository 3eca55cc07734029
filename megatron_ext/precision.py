"""Precision names of configs and command lines (`train.precision`, `--dtype`) and their dtypes:
the one table."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
NAMES: tuple[str, ...] = tuple(DTYPES)
