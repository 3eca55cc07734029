"""Presets: parameter counts against published sizes and transformers; `describe` command."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.cli import main
from megatron_ext.models import count_parameters, get_family, get_preset, preset_names

# Published sizes: HF model pages (exact where they print it) and the FinGPT model cards.
EXACT = {
    "bloom-560m": 559_214_592,  # HF vocabulary 250,880
    "bloom-176b": 176_247_271_424,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
}
# Model-card figures, rounded there: (value, relative tolerance).
ROUNDED = {
    "fingpt-186m": (186e6, 0.005),
    "fingpt-437m": (437e6, 0.005),
    "fingpt-881m": (881e6, 0.005),
    "fingpt-1.5b": (1.5e9, 0.01),
    "fingpt-3b": (2.8e9, 0.02),  # card "2.8B"; the card's shape gives 2.853B
    "fingpt-13b": (13.3e9, 0.01),
    "poro-34b": (34.2e9, 0.005),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_published_counts(name):
    assert count_parameters(get_preset(name))["num_parameters"] == EXACT[name]


@pytest.mark.parametrize("name", list(ROUNDED))
def test_model_card_counts(name):
    value, tol = ROUNDED[name]
    n = count_parameters(get_preset(name))["num_parameters"]
    assert abs(n - value) / value < tol, n


def test_fingpt_8b_card_figure_counts_an_untied_output_layer():
    """The card says 7.5B for 32 x 4096 x 32; with BLOOM's tied embeddings that shape has
    6.98B parameters; 7.5B is what an untied output layer would add up to."""
    config = get_preset("fingpt-8b")
    assert count_parameters(config)["num_parameters"] == 6_981_042_176
    untied = count_parameters(config.replace(tied_embeddings=False))["num_parameters"]
    assert abs(untied - 7.5e9) / 7.5e9 < 0.005


def _hf_count(config) -> int:
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    cls, cfg_cls = {
        "bloom": (BloomForCausalLM, BloomConfig),
        "llama": (LlamaForCausalLM, LlamaConfig),
    }[config.family]
    with torch.device("meta"):
        model = cls(cfg_cls(**get_family(config.family).to_hf_config(config)))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_counts_like_transformers(name):
    config = get_preset(name)
    assert count_parameters(config)["num_parameters"] == _hf_count(config)


def test_padding_is_counted_separately():
    config = get_preset("tiny").replace(vocab_size=50257)
    h = config.hidden_size
    for tp, padded in [(1, 50304), (2, 50432), (4, 50688)]:
        c = count_parameters(config, tp)
        assert c["padded_vocab_size"] == padded
        assert c["num_parameters_padded"] - c["num_parameters"] == (padded - 50257) * h
    untied = count_parameters(config.replace(tied_embeddings=False), 4)
    assert untied["num_parameters_padded"] - untied["num_parameters"] == 2 * (50688 - 50257) * h
    assert untied["parts"]["output_layer"] == 50257 * h
    fingpt = count_parameters(get_preset("fingpt-13b"), 8)  # 131072 needs no padding
    assert fingpt["num_parameters"] == fingpt["num_parameters_padded"]


def test_describe_json(capsys):
    assert main(["describe", "bloom-560m", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_parameters"] == 559_214_592
    assert sum(doc["parts"].values()) == doc["num_parameters"]
    assert set(doc["per_layer"]) == {"attention", "mlp", "norms", "total"}
    assert doc["config"]["position_embedding"] == "alibi"


def test_describe_yaml_overrides_and_errors(tmp_path, capsys):
    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny-llama\nvocab_size: 50257\n")
    assert main(["describe", str(path), "num_layers=3", "--tp", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["config"]["num_layers"] == 3 and doc["padded_vocab_size"] == 50432
    assert main(["describe", "tiny"]) == 0
    assert "parameters" in capsys.readouterr().out
    assert main(["describe", "no-such-model"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert main(["describe", "tiny", "--set", "num_attention_heads=5"]) == 2
    assert "divisible" in capsys.readouterr().err
