"""Named model presets, gathered from the model families (recipe defaults + shape).

`get_preset("fingpt-186m")` -> ModelConfig. `tiny` (BLOOM recipe) and `tiny-llama` are for
tests and demos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_ext import config as config_io
from megatron_ext.errors import UserError
from megatron_ext.models import bloom, llama
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import ModelFamily

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (bloom.FAMILY, llama.FAMILY)}

PRESETS: dict[str, tuple[str, dict]] = {
    name: (family.name, shape)
    for family in FAMILIES.values()
    for name, shape in family.presets.items()
}


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The preset `name` as a ModelConfig (a fresh object each call)."""
    if name not in PRESETS:
        raise UserError(
            f"unknown model preset {name!r}; known: {', '.join(PRESETS)} "
            "(or give a YAML file of ModelConfig fields)"
        )
    family, shape = PRESETS[name]
    return ModelConfig(**{**FAMILIES[family].recipe, **shape})


def resolve_model_config(
    spec: str | dict[str, Any] | ModelConfig, where: str = "model"
) -> ModelConfig:
    """A preset name, a dict of fields with an optional "preset" key, or a ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str):
        return get_preset(spec)
    data = dict(spec)
    preset = data.pop("preset", None)
    if preset is None:
        return ModelConfig.from_dict(data, where)
    preset_config = get_preset(preset)
    base = preset_config.to_dict()
    # Fields the preset left at their derived value are derived again from the new shape.
    derived = ModelConfig(
        hidden_size=preset_config.hidden_size,
        num_attention_heads=preset_config.num_attention_heads,
        activation=preset_config.activation,
    )
    for name in ("ffn_hidden_size", "num_kv_heads"):
        if getattr(preset_config, name) == getattr(derived, name):
            base.pop(name)
    base.update(data)
    return ModelConfig.from_dict(base, f"{where} (preset {preset})")


def load_model_yaml(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A YAML file of ModelConfig fields (or `preset:` plus fields), then dotted overrides."""
    data = config_io.read_yaml(path)
    config_io.apply_overrides(data, list(overrides), where=str(path))
    return resolve_model_config(data, where=str(path))
