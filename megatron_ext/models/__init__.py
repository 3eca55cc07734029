"""Decoder-only LMs (BLOOM and Llama families) built from a ModelConfig with our TP layers."""

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.model import TransformerLM, build_model, build_stage, count_parameters
from megatron_ext.models.presets import (
    FAMILIES,
    get_family,
    get_preset,
    preset_names,
    resolve_model_config,
)
from megatron_ext.models.transformer import EmbeddingStage, HeadStage, TransformerBlock

__all__ = [
    "FAMILIES",
    "EmbeddingStage",
    "HeadStage",
    "ModelConfig",
    "TransformerBlock",
    "TransformerLM",
    "build_model",
    "build_stage",
    "count_parameters",
    "get_family",
    "get_preset",
    "preset_names",
    "resolve_model_config",
]
