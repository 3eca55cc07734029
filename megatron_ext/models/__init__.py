"""Decoder-only LMs (BLOOM and Llama families) built from a ModelConfig with our TP layers.

The names below load their module on first use: `megatron_ext.models.config` (ModelConfig, no
torch) can then be imported by the run config without importing torch, which the trainer's
early signal handlers rely on (they are installed before torch loads).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ModelConfig": "config",
    "TransformerLM": "model",
    "build_model": "model",
    "build_stage": "model",
    "count_parameters": "model",
    "FAMILIES": "presets",
    "get_family": "presets",
    "get_preset": "presets",
    "preset_names": "presets",
    "resolve_model_config": "presets",
    "EmbeddingStage": "transformer",
    "HeadStage": "transformer",
    "TransformerBlock": "transformer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
