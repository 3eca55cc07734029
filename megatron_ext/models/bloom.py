"""BLOOM family (FinGPT, BLOOM, BLUUMI, Poro): recipe, presets, HF key map.

Recipe: ALiBi, LayerNorm (also right after the embedding), GeLU MLP (4h), tied input/output
embeddings, biases everywhere, pre-LN. HF `BloomForCausalLM` fuses QKV per head as
[np, 3, hn], which is our fused layout with one query head per group, so the map is 1:1.
"""

from __future__ import annotations

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import (
    KeyMapEntry,
    MegatronDeepSpeed,
    ModelFamily,
    megatron_block_keys,
    require_fields,
)

RECIPE = {
    "family": "bloom",
    "position_embedding": "alibi",
    "norm": "layernorm",
    "layernorm_epsilon": 1e-5,
    "embedding_layernorm": True,
    "activation": "gelu",
    "tied_embeddings": True,
    "bias": True,
    "seq_length": 2048,
}

_FINGPT_VOCAB = 131072  # byte-level BPE trained on Finnish; bos 1, eos 2, pad 3
# BLOOM's tokenizer has 250,680 tokens; HF's checkpoints (and these presets) carry the table
# padded to 250,880, so the presets convert 1:1 with them. Set vocab_size=250680 to train with
# the real vocabulary: it pads back to 250,880 for tp <= 8.
_BLOOM_HF_VOCAB = 250880


def _shape(layers: int, hidden: int, heads: int, vocab: int, **extra) -> dict:
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        **extra,
    }


# FinGPT sizes: TurkuNLP model cards (layers, hidden, heads).
PRESETS = {
    "fingpt-186m": _shape(12, 768, 12, _FINGPT_VOCAB),
    "fingpt-437m": _shape(24, 1024, 16, _FINGPT_VOCAB),
    "fingpt-881m": _shape(24, 1536, 16, _FINGPT_VOCAB),
    "fingpt-1.5b": _shape(24, 2064, 24, _FINGPT_VOCAB),
    "fingpt-3b": _shape(32, 2560, 32, _FINGPT_VOCAB),
    "fingpt-8b": _shape(32, 4096, 32, _FINGPT_VOCAB),
    "fingpt-13b": _shape(40, 5120, 40, _FINGPT_VOCAB),
    "bloom-560m": _shape(24, 1024, 16, _BLOOM_HF_VOCAB),
    "bloom-176b": _shape(70, 14336, 112, _BLOOM_HF_VOCAB, init_std=0.0048),
    "poro-34b": _shape(54, 7168, 56, 128000),
    "tiny": _shape(2, 64, 4, 1000, seq_length=128),
}

_L, _O = "transformer.h.{layer}.", "layers.{layer}."
# (our name, HF name, TP split rule); every BLOOM tensor maps 1:1 ("identity" transform).
_PAIRS = [
    ("embedding.word_embeddings.weight", "transformer.word_embeddings.weight", "vocab"),
    ("embedding.norm.weight", "transformer.word_embeddings_layernorm.weight", None),
    ("embedding.norm.bias", "transformer.word_embeddings_layernorm.bias", None),
    (_O + "input_norm.weight", _L + "input_layernorm.weight", None),
    (_O + "input_norm.bias", _L + "input_layernorm.bias", None),
    (_O + "attention.linear_qkv.weight", _L + "self_attention.query_key_value.weight", "qkv"),
    (_O + "attention.linear_qkv.bias", _L + "self_attention.query_key_value.bias", "qkv"),
    (_O + "attention.linear_proj.weight", _L + "self_attention.dense.weight", "row"),
    (_O + "attention.linear_proj.bias", _L + "self_attention.dense.bias", None),
    (_O + "post_attention_norm.weight", _L + "post_attention_layernorm.weight", None),
    (_O + "post_attention_norm.bias", _L + "post_attention_layernorm.bias", None),
    (_O + "mlp.linear_fc1.weight", _L + "mlp.dense_h_to_4h.weight", "column"),
    (_O + "mlp.linear_fc1.bias", _L + "mlp.dense_h_to_4h.bias", "column"),
    (_O + "mlp.linear_fc2.weight", _L + "mlp.dense_4h_to_h.weight", "row"),
    (_O + "mlp.linear_fc2.bias", _L + "mlp.dense_4h_to_h.bias", None),
    ("head.final_norm.weight", "transformer.ln_f.weight", None),
    ("head.final_norm.bias", "transformer.ln_f.bias", None),
]
KEY_MAP = (
    *(KeyMapEntry(ours, (hf,), tp_split=split) for ours, hf, split in _PAIRS),
    KeyMapEntry(
        "head.output_layer.weight",
        ("lm_head.weight",),
        tp_split="vocab",
        requires="!tied_embeddings",
    ),
)

# BigScience Megatron-DeepSpeed (BLOOM, FinGPT, BLUUMI): GPTModelPipe with transpose layers
# around the blocks: 0 _to_float16, 1 tied embedding (+ its LayerNorm), 2 transpose, blocks
# 3..L+2, L+3 transpose back, L+4 final LayerNorm, L+5 the tied embedding again (no file).
MEGATRON_DEEPSPEED = MegatronDeepSpeed(
    block_offset=2,
    final_offset=2,
    keys={
        "embedding.word_embeddings.weight": ("embed", "word_embeddings.weight"),
        "embedding.norm.weight": ("embed", "word_embeddings.norm.weight"),
        "embedding.norm.bias": ("embed", "word_embeddings.norm.bias"),
        **megatron_block_keys(),
        "head.final_norm.weight": ("final", "weight"),
        "head.final_norm.bias": ("final", "bias"),
    },
    requires={
        "position_embedding_type": "alibi",
        "embed_layernorm": True,
        "glu_activation": None,
        "swiglu": False,
        "normalization": "layernorm",
        "add_bias_linear": True,
        "apply_residual_connection_post_layernorm": False,
    },
    description="a BLOOM-architecture model (ALiBi, embedding LayerNorm, GeLU, linear biases, "
    "pre-LN residual)",
)


def check_hf_compatible(config: ModelConfig) -> None:
    """Raise if `config` has no BloomForCausalLM equivalent (names the field to change)."""
    wanted = {
        "position_embedding": "alibi",
        "norm": "layernorm",
        "embedding_layernorm": True,
        "activation": "gelu",
        "bias": True,
        "num_kv_heads": config.num_attention_heads,
        "ffn_hidden_size": 4 * config.hidden_size,
    }
    require_fields(config, "BloomForCausalLM", wanted)


def to_hf_config(config: ModelConfig) -> dict:
    """kwargs for transformers.BloomConfig."""
    check_hf_compatible(config)
    return {
        "architectures": ["BloomForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "n_layer": config.num_layers,
        "n_head": config.num_attention_heads,
        "layer_norm_epsilon": config.layernorm_epsilon,
        "initializer_range": config.init_std,
        "hidden_dropout": config.hidden_dropout,
        "attention_dropout": config.attention_dropout,
        "tie_word_embeddings": config.tied_embeddings,
    }


def from_hf_config(hf: dict) -> ModelConfig:
    """ModelConfig from a BloomConfig dict (`config.to_dict()` or config.json)."""
    fields = {
        **RECIPE,
        "tied_embeddings": hf.get("tie_word_embeddings", True),
        "num_layers": hf.get("n_layer", hf.get("num_hidden_layers")),
        "hidden_size": hf.get("hidden_size", hf.get("n_embed")),
        "num_attention_heads": hf.get("n_head", hf.get("num_attention_heads")),
        "vocab_size": hf["vocab_size"],
        "layernorm_epsilon": hf.get("layer_norm_epsilon", 1e-5),
        "init_std": hf.get("initializer_range", 0.02),
        "hidden_dropout": float(hf.get("hidden_dropout", 0.0)),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
    }
    return ModelConfig(**fields)


FAMILY = ModelFamily(
    name="bloom",
    hf_architecture="BloomForCausalLM",
    recipe=RECIPE,
    presets=PRESETS,
    key_map=KEY_MAP,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
    hf_tied_keys={"lm_head.weight": "transformer.word_embeddings.weight"},
    megatron_deepspeed=MEGATRON_DEEPSPEED,
)
