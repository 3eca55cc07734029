"""Llama family: recipe, presets, HF key map.

Recipe: RoPE (rotate-half, HF convention), RMSNorm, SwiGLU MLP, grouped-query attention,
no biases, untied output layer, no embedding norm. HF `LlamaForCausalLM` keeps q/k/v and
gate/up separate; the key map fuses them into our [nkv, g + 2, hn] QKV rows and [gate; up]
rows (transforms "qkv_from_q_k_v" and "glu_from_gate_up").
"""

from __future__ import annotations

from megatron_ext.errors import UserError
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import (
    KeyMapEntry,
    MegatronDeepSpeed,
    ModelFamily,
    megatron_block_keys,
    require_fields,
)

RECIPE = {
    "family": "llama",
    "position_embedding": "rope",
    "norm": "rmsnorm",
    "layernorm_epsilon": 1e-5,
    "embedding_layernorm": False,
    "activation": "swiglu",
    "tied_embeddings": False,
    "bias": False,
}


def _shape(layers, hidden, heads, kv, ffn, vocab, seq, theta=10000.0) -> dict:
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "ffn_hidden_size": ffn,
        "vocab_size": vocab,
        "seq_length": seq,
        "rope_theta": theta,
    }


# Shapes of Meta's released checkpoints (HF config.json of meta-llama/*).
PRESETS = {
    "llama-2-7b": _shape(32, 4096, 32, 32, 11008, 32000, 4096),
    "llama-2-13b": _shape(40, 5120, 40, 40, 13824, 32000, 4096),
    "llama-2-70b": _shape(80, 8192, 64, 8, 28672, 32000, 4096),
    "llama-3-8b": _shape(32, 4096, 32, 8, 14336, 128256, 8192, 500000.0),
    "llama-3-70b": _shape(80, 8192, 64, 8, 28672, 128256, 8192, 500000.0),
    "tiny-llama": _shape(2, 64, 8, 2, 160, 1000, 128),
}

_L, _O = "model.layers.{layer}.", "layers.{layer}."
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GLU = ("mlp.gate_proj", "mlp.up_proj")


def _fused(ours: str, hf_modules: tuple[str, ...], kind: str, transform: str, **kw) -> KeyMapEntry:
    hf = tuple(f"{_L}{m}.{kind}" for m in hf_modules)
    return KeyMapEntry(f"{_O}{ours}.{kind}", hf, transform, **kw)


# (our name, HF name, TP split rule, config flag the entry needs)
_PAIRS = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight", "vocab", None),
    (_O + "input_norm.weight", _L + "input_layernorm.weight", None, None),
    (_O + "attention.linear_proj.weight", _L + "self_attn.o_proj.weight", "row", None),
    (_O + "attention.linear_proj.bias", _L + "self_attn.o_proj.bias", None, "bias"),
    (_O + "post_attention_norm.weight", _L + "post_attention_layernorm.weight", None, None),
    (_O + "mlp.linear_fc2.weight", _L + "mlp.down_proj.weight", "row", None),
    (_O + "mlp.linear_fc2.bias", _L + "mlp.down_proj.bias", None, "bias"),
    ("head.final_norm.weight", "model.norm.weight", None, None),
    ("head.output_layer.weight", "lm_head.weight", "vocab", "!tied_embeddings"),
]
KEY_MAP = (
    *(KeyMapEntry(o, (h,), tp_split=s, requires=r) for o, h, s, r in _PAIRS),
    _fused("attention.linear_qkv", _QKV, "weight", "qkv_from_q_k_v", tp_split="qkv"),
    _fused("attention.linear_qkv", _QKV, "bias", "qkv_from_q_k_v", tp_split="qkv", requires="bias"),
    _fused("mlp.linear_fc1", _GLU, "weight", "glu_from_gate_up", tp_split="glu"),
    _fused("mlp.linear_fc1", _GLU, "bias", "glu_from_gate_up", tp_split="glu", requires="bias"),
)

# Microsoft/LumiOpen Megatron-DeepSpeed with --swiglu --normalization rmsnorm
# --use-rotary-position-embeddings --disable-bias-linear [--untie-embeddings-and-output-weights]
# [--num-key-value-heads N]: GPTModelPipe without transpose layers: 0 _to_float16,
# 1 embedding, blocks 2..L+1, L+2 final RMSNorm, L+3 lm_head (untied only).
MEGATRON_DEEPSPEED = MegatronDeepSpeed(
    block_offset=1,
    final_offset=1,
    keys={
        "embedding.word_embeddings.weight": ("embed", "word_embeddings.weight"),
        **megatron_block_keys(),
        "head.final_norm.weight": ("final", "weight"),
        "head.output_layer.weight": ("head", "lm_head.weight"),
    },
    requires={
        "swiglu": True,
        "normalization": "rmsnorm",
        "position_embedding_type": "rope",
        "add_position_embedding": False,
        "rotary_percent": 1.0,
        "add_bias_linear": False,
        "glu_activation": None,
        "apply_residual_connection_post_layernorm": False,
    },
    description="a Llama-architecture model (SwiGLU, RMSNorm, rotary positions on whole heads, "
    "no learned positions, no linear biases, pre-norm residual)",
)


def check_hf_compatible(config: ModelConfig) -> None:
    """Raise if `config` has no LlamaForCausalLM equivalent (names the field to change)."""
    wanted = {
        "position_embedding": "rope",
        "norm": "rmsnorm",
        "embedding_layernorm": False,
        "activation": "swiglu",
    }
    require_fields(config, "LlamaForCausalLM", wanted)


def to_hf_config(config: ModelConfig) -> dict:
    """kwargs for transformers.LlamaConfig."""
    check_hf_compatible(config)
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads,
        "max_position_embeddings": config.seq_length,
        "rms_norm_eps": config.layernorm_epsilon,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tied_embeddings,
        "hidden_act": "silu",
    }


def from_hf_config(hf: dict) -> ModelConfig:
    """ModelConfig from a LlamaConfig dict (`config.to_dict()` or config.json)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(
            f"LlamaForCausalLM config: rope_type {rope.get('rope_type')!r} is not supported "
            "(only the original RoPE); Llama 3.1+ frequency scaling is not implemented"
        )
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise UserError("LlamaForCausalLM config: attention_bias and mlp_bias must agree")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"LlamaForCausalLM config: hidden_act {hf['hidden_act']!r} is not silu")
    fields = {
        **RECIPE,
        "num_layers": hf["num_hidden_layers"],
        "hidden_size": hf["hidden_size"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "ffn_hidden_size": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"],
        "seq_length": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        "layernorm_epsilon": hf.get("rms_norm_eps", 1e-6),
        "bias": bool(hf.get("attention_bias", False)),
        "tied_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": hf.get("initializer_range", 0.02),
        "attention_dropout": float(hf.get("attention_dropout", 0.0)),
    }
    return ModelConfig(**fields)


FAMILY = ModelFamily(
    name="llama",
    hf_architecture="LlamaForCausalLM",
    recipe=RECIPE,
    presets=PRESETS,
    key_map=KEY_MAP,
    to_hf_config=to_hf_config,
    from_hf_config=from_hf_config,
    hf_tied_keys={"lm_head.weight": "model.embed_tokens.weight"},
    megatron_deepspeed=MEGATRON_DEEPSPEED,
)
