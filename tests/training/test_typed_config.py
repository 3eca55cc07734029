"""The run config's model is a typed ModelConfig, resolved once at load: the preset expanded,
seq_length taken from data.seq_length, unknown fields refused, saved whole (no preset name).
A checkpoint config saved with a preset name still loads, with one warning."""

from __future__ import annotations

import logging

import pytest
import yaml

from megatron_ext.cli import main
from megatron_ext.config import dump_yaml, from_dict
from megatron_ext.errors import UserError
from megatron_ext.models.presets import get_preset
from megatron_ext.training.config import RunConfig, saved_run_config

BASE = ["train", "--config", "examples/tiny_bloom.yaml", "data.path=x", "checkpoint.dir=y"]


def test_the_model_is_resolved_once():
    cfg = from_dict(RunConfig, {"model": {"preset": "tiny", "hidden_size": 96},
                                "data": {"seq_length": 32}})  # fmt: skip
    assert cfg.model.hidden_size == 96 and cfg.model.ffn_hidden_size == 4 * 96  # derived again
    assert cfg.model.seq_length == 32
    assert from_dict(RunConfig, {"model": "tiny-llama"}).model.family == "llama"
    saved = yaml.safe_load(dump_yaml(cfg))["model"]
    assert "preset" not in saved and saved["hidden_size"] == 96 and saved["num_layers"] == 2
    assert from_dict(RunConfig, yaml.safe_load(dump_yaml(cfg))) == cfg  # round trip
    with pytest.raises(UserError, match="unknown key.*hiden_size; known: activation"):
        from_dict(RunConfig, {"model": {"preset": "tiny", "hiden_size": 3}})


def test_dry_run_prints_the_resolved_model_and_refuses_typos(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main([*BASE, "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("\nstage 0:", 1)[0])
    assert printed["model"]["hidden_size"] == get_preset("tiny").hidden_size
    assert main([*BASE, "model.hiden_size=3", "--dry-run"]) == 2
    assert "unknown key(s) hiden_size" in capsys.readouterr().err


def test_a_config_saved_with_a_preset_name_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "data": {"seq_length": 48}}))
    logger = logging.getLogger("megatron_ext")
    logger.addHandler(caplog.handler)
    try:
        cfg = saved_run_config(path)
    finally:
        logger.removeHandler(caplog.handler)
    assert cfg.model == get_preset("tiny").replace(seq_length=48)
    assert "read from this version's preset table" in caplog.text
