"""Named model presets, gathered from the model families (recipe defaults + shape).

`get_preset("fingpt-186m")` -> ModelConfig. `tiny` (BLOOM recipe) and `tiny-llama` are for
tests and demos.
"""

from __future__ import annotations

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
