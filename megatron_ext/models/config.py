"""ModelConfig: the shape and recipe of a decoder-only transformer, loadable from YAML.

A config is either written out field by field or starts from a preset
(`{"preset": "fingpt-186m", "seq_length": 1024}`, see `presets.resolve_model_config`). YAML round trip
and dotted overrides (`hidden_size=96`) go through `megatron_ext.config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_ext import config as config_io
from megatron_ext.errors import UserError


@dataclass
class ModelConfig:
    """Decoder-only LM. `None` fields are resolved in __post_init__ (saved explicitly)."""

    family: str = "bloom"  # the family whose HF key map converts it: bloom | llama
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_attention_heads (no GQA)
    ffn_hidden_size: int | None = None  # None: 4h (gelu) or Llama's 8h/3 rounded to 256 (swiglu)
    vocab_size: int = 1000  # real tokens; the embedding is padded (see padded_vocab_size)
    make_vocab_size_divisible_by: int = 128  # times tp_size
    seq_length: int = 2048
    position_embedding: Literal["alibi", "rope", "learned"] = "alibi"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    layernorm_epsilon: float = 1e-5
    embedding_layernorm: bool = True
    activation: Literal["gelu", "swiglu"] = "gelu"
    tied_embeddings: bool = True
    bias: bool = True  # biases of all linear layers
    init_std: float = 0.02
    scaled_output_init: bool = True  # std / sqrt(2 L) for projections into the residual stream
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    fused_ops: bool = True  # megatron_ext.ops fused kernels; False: their PyTorch references
    # core attention (megatron_ext.models.core_attention): "softmax" (ours, scores materialised),
    # "sdpa" (torch's fused attention, ALiBi as a bias), "flex" (FlexAttention, ALiBi as a score
    # modification), "auto": flex for ALiBi / sdpa otherwise on NVIDIA GPUs, softmax on CPU
    attention_backend: Literal["auto", "softmax", "sdpa", "flex"] = "auto"

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_attention_heads
        if self.ffn_hidden_size is None:
            if self.activation == "gelu":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> UserError:
            return UserError(f"model config: {msg}")

        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("vocab_size", "ffn_hidden_size", "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise bad(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise bad(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_kv_heads:
            raise bad(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_kv_heads {self.num_kv_heads}"
            )
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise bad(f"rope needs an even head dimension, got {self.head_dim}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.attention_backend == "flex" and self.attention_dropout > 0:
            raise bad(
                "attention_backend flex has no attention dropout; set attention_dropout=0 or "
                "choose attention_backend softmax or sdpa (auto avoids flex with dropout)"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp_size: int = 1) -> int:
        """vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp_size."""
        multiple = self.make_vocab_size_divisible_by * tp_size
        return multiple * math.ceil(self.vocab_size / multiple)

    def check_tp(self, tp_size: int) -> None:
        """Raise if this model cannot be split over `tp_size` ranks (says what to change)."""
        if self.num_attention_heads % tp_size:
            raise UserError(
                f"model config: num_attention_heads {self.num_attention_heads} is not divisible "
                f"by tp={tp_size}; choose a TP size that divides the number of heads"
            )
        kv = self.num_kv_heads
        if kv % tp_size and tp_size % kv:
            raise UserError(
                f"model config: num_kv_heads {kv} and tp={tp_size}: one must divide the other "
                "(kv heads are split when tp divides them, replicated when they divide tp)"
            )
        if self.ffn_hidden_size % tp_size:
            raise UserError(
                f"model config: ffn_hidden_size {self.ffn_hidden_size} is not divisible by "
                f"tp={tp_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        return config_io.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> ModelConfig:
        return config_io.from_dict(cls, data, where)

    def save_yaml(self, path: str | Path) -> None:
        config_io.dump_yaml(self, path)

    def with_overrides(self, overrides: list[str]) -> ModelConfig:
        """A copy with `field=value` overrides applied (values parsed as YAML)."""
        data = config_io.apply_overrides(self.to_dict(), list(overrides))
        return ModelConfig.from_dict(data, where="override")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
