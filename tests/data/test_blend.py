"""Blends: YAML and --data-path forms, upsampling, realised fractions, bad input, the CLI."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from megatron_ext import cli
from megatron_ext.data.blend import (
    BlendConfig,
    BlendedDataset,
    BlendSource,
    build_datasets,
    log_plan,
    plan_blend,
)
from megatron_ext.data.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron_ext.errors import UserError
from tests.data.test_gpt_dataset import make_dataset


@pytest.fixture
def three(tmp_path):
    """Three small sources of different sizes, and a YAML blend of them by upsampling."""
    prefixes = {}
    for name, n, seed in (("web", 120, 1), ("news", 40, 2), ("wiki", 60, 3)):
        prefixes[name], _ = make_dataset(tmp_path / name, n, seed=seed)
    blend = tmp_path / "blend.yaml"
    blend.write_text(
        "- {path: web, upsample: 1}\n"
        "- {path: news, upsample: 2}\n"
        "- {path: wiki, upsample: 3, name: fiwiki}\n"
    )
    return tmp_path, prefixes, str(blend)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_yaml_forms(tmp_path, three):
    _, prefixes, blend_path = three
    blend = BlendConfig.from_yaml(blend_path)
    assert [s.name for s in blend.sources] == ["web", "news", "fiwiki"]
    assert blend.sources[0].path == prefixes["web"]  # relative to the YAML file
    weights = BlendConfig.from_yaml(
        write(
            tmp_path / "w.yaml",
            f"- {{path: {prefixes['web']}, weight: 3}}\n"
            f"- {{path: {prefixes['news']}, weight: 1}}\n",
        )
    )
    np.testing.assert_allclose(weights.target_weights([10, 1000]), [0.75, 0.25])


@pytest.mark.parametrize(
    "text,match",
    [
        ("- {path: a, weight: -1}\n", "finite number >= 0"),
        ("- {path: a, weight: 0}\n- {path: b, weight: 0}\n", "all weights are zero"),
        ("- {path: a, weight: 1}\n- {path: b, upsample: 2}\n", "mixes them"),
        ("- {path: a, weight: 1, upsample: 2}\n", "not both"),
        ("- {path: a, wieght: 1}\n", "unknown keys"),
        ("- {weight: 1}\n", "with a 'path'"),
        ("path: a\n", "YAML list"),
        ("- {path: a, weight: lots}\n", "must be numbers"),
        ("[unclosed\n", "invalid YAML"),
        ("[]\n", "no sources"),
    ],
)
def test_bad_yaml(tmp_path, text, match):
    with pytest.raises(UserError, match=match):
        BlendConfig.from_yaml(write(tmp_path / "bad.yaml", text))


def test_data_path_forms():
    blend = BlendConfig.from_data_path(["0.3", "/d/a", "0.7", "/d/b"])
    assert [(s.path, s.weight) for s in blend.sources] == [("/d/a", 0.3), ("/d/b", 0.7)]
    prefixes_only = BlendConfig.from_data_path(["/d/a", "/d/b"])
    np.testing.assert_allclose(prefixes_only.target_weights([100, 300]), [0.25, 0.75])  # by tokens
    for bad in (["0.3", "/d/a", "0.7"], ["/d/a", "0.5"], [], ["-1", "/d/a"]):
        with pytest.raises(UserError):
            BlendConfig.from_data_path(bad)


def test_upsampling_converts_to_token_weights():
    blend = BlendConfig(
        [BlendSource("a", upsample=3), BlendSource("b", upsample=1), BlendSource("c", upsample=0)]
    )
    # a: 1000 tokens x3 = 3000, b: 3000 tokens x1 = 3000, c never
    np.testing.assert_allclose(blend.target_weights([1000, 3000, 5000]), [0.5, 0.5, 0.0])
    fingpt = {"parsebank": 1.5, "mc4": 1, "fiwiki": 3, "yle": 2}
    tokens = {"parsebank": 8e9, "mc4": 10e9, "fiwiki": 0.5e9, "yle": 1e9}
    blend = BlendConfig([BlendSource(k, upsample=v) for k, v in fingpt.items()])
    w = blend.target_weights(list(tokens.values()))
    per_token = w / np.array(list(tokens.values()))  # how often each token is seen, relatively
    np.testing.assert_allclose(per_token / per_token[1], list(fingpt.values()))


def test_blended_fractions_and_contents(three):
    _, prefixes, blend_path = three
    train, valid, test = build_datasets(blend_path, 16, (2000, 100, 0), split="90,10,0", seed=5)
    assert test is None and isinstance(train, BlendedDataset) and len(train) == 2000
    plan = train.plan
    counts = np.bincount(np.asarray(train.source_index), minlength=3)
    for s, count in zip(plan.sources, counts, strict=True):
        assert s.samples == count and abs(count - s.weight * 2000) < 1
        assert s.epochs == pytest.approx(count * 16 / s.tokens)
    realised = np.cumsum(np.eye(3, dtype=np.int64)[np.asarray(train.source_index)], axis=0)
    target = np.outer(np.arange(1, 2001), [s.weight for s in plan.sources])
    assert np.abs(realised - target).max() < 1  # within one sample at every prefix
    for t in (0, 1, 2, 777, 1999):
        d, k = int(train.source_index[t]), int(train.sample_in_source[t])
        np.testing.assert_array_equal(train[t]["tokens"], train.datasets[d][k]["tokens"])
    assert valid.plan.split == "valid" and len(valid) == 100


def test_single_prefix_gives_a_gpt_dataset(three):
    _, prefixes, _ = three
    train, valid, test = build_datasets(prefixes["web"], 16, {"train": 30})
    assert isinstance(train, GPTDataset) and len(train) == 30 and valid is None and test is None


def test_missing_prefix(three):
    tmp, prefixes, _ = three
    blend = write(tmp / "m.yaml", "- {path: web, weight: 1}\n- {path: missing, weight: 1}\n")
    with pytest.raises(UserError, match="missing.idx: no such file"):
        build_datasets(blend, 16, (10, 0, 0), cache_dir=str(tmp / "cache"))
    assert not (tmp / "cache").exists()


def test_mismatched_dtypes_and_vocabularies(three):
    tmp, prefixes, _ = three
    make_dataset(tmp / "wide", 20, dtype=np.int32)
    with pytest.raises(UserError, match="different dtypes"):
        build_datasets(["1", prefixes["web"], "1", str(tmp / "wide")], 16, (10, 0, 0))
    blend = write(
        tmp / "v.yaml",
        "- {path: web, weight: 1, vocab_size: 131072}\n"
        "- {path: news, weight: 1, vocab_size: 50257}\n",
    )
    with pytest.raises(UserError, match="different vocabularies"):
        build_datasets(blend, 16, (10, 0, 0))


def test_empty_split_refused_before_any_index(three):
    tmp, prefixes, _ = three
    tiny, _ = make_dataset(tmp / "tiny", 5, seed=9, max_len=30)
    cache = tmp / "cache"
    # "80,10,10" over 5 documents: train 0..3, valid empty (4.5 rounds to 4), test 4
    data_path = ["1", prefixes["web"], "1", tiny]
    with pytest.raises(UserError, match="tiny.*valid split without tokens"):
        build_datasets(data_path, 16, (100, 10, 0), split="80,10,10", cache_dir=str(cache))
    assert not cache.exists() or not [p for p in os.listdir(cache) if not p.startswith(".")]
    # no valid samples asked, or weight 0 for the empty source: fine
    assert build_datasets(data_path, 16, (100, 0, 0), split="80,10,10")[1] is None
    valid = build_datasets(["1", prefixes["web"], "0", tiny], 16, (0, 10, 0), split="80,10,10")[1]
    assert len(valid) == 10


def test_plan_table_and_repetition_warning(three):
    _, _, blend_path = three
    config = GPTDatasetConfig(seq_length=64, split="1")
    plan, _ = plan_blend(BlendConfig.from_yaml(blend_path), "train", 2000, config)
    assert "fiwiki" in plan.table() and "epochs" in plan.table()
    assert any(s.epochs > 4 for s in plan.sources)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("megatron_ext.data.blend")
    logger.addHandler(handler)
    try:
        log_plan(plan)
    finally:
        logger.removeHandler(handler)
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warned and all("repeated data" in m for m in warned)
    assert len(warned) == sum(s.epochs > 4 for s in plan.sources)


def test_inspect_blend_json(three, capsys, monkeypatch):
    tmp, _, blend_path = three
    monkeypatch.chdir(tmp)
    argv = [
        "inspect-blend",
        "--blend",
        blend_path,
        "--seq-length",
        "16",
        "--num-samples",
        "500",
        "--data-split",
        "90,10,0",
        "--json",
    ]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in out["sources"]] == ["web", "news", "fiwiki"]
    assert sum(s["samples"] for s in out["sources"]) == 500
    for s in out["sources"]:
        assert set(s) >= {"name", "path", "tokens", "weight", "samples", "fraction", "epochs"}
        assert abs(s["fraction"] - s["weight"]) <= 1 / 500
    assert out["cache_path"].startswith("index-cache/blend-train-")
    assert not (tmp / "index-cache").exists() or not [
        p for p in os.listdir(tmp / "index-cache") if not p.startswith(".")
    ]
    assert cli.main(argv[:-1] + ["--split", "test"]) == 2  # empty test split: clear error
    assert "test split without tokens" in capsys.readouterr().err


def test_build_index_command_then_training_loads(three, capsys):
    tmp, _, blend_path = three
    cache = str(tmp / "cache")
    argv = [
        "build-index",
        "--blend",
        blend_path,
        "--seq-length",
        "16",
        "--train-samples",
        "300",
        "--valid-samples",
        "20",
        "--data-split",
        "90,10,0",
        "--cache-dir",
        cache,
        "--json",
    ]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["splits"]) == {"train", "valid"} and out["splits"]["train"]["samples"] == 300
    train, valid, _ = build_datasets(blend_path, 16, (300, 20, 0), split="90,10,0", cache_dir=cache)
    assert not any(ds.built_index for ds in train.datasets + valid.datasets)


def test_inspect_blend_prints_the_repetition_warning(three, capsys, monkeypatch):
    """The README promised it; only training's log had it."""
    tmp, _, blend_path = three
    monkeypatch.chdir(tmp)
    argv = ["inspect-blend", "--blend", blend_path, "--seq-length", "64", "--num-samples", "2000"]
    assert cli.main([*argv, "--data-split", "1"]) == 0
    out = capsys.readouterr().out
    assert "warning: fiwiki:" in out and "repeated data loses most of its value" in out
    assert cli.main([*argv, "--data-split", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"]


@pytest.mark.parametrize(
    "text,match",
    [
        ("- {path: a, weight: true}\n- {path: b, weight: 1}\n", "weight must be a number, got"),
        ("- {path: a, upsample: false}\n", "upsample must be a number"),
        ("- {path: a, weight: 1}\n- {path: ./a, weight: 2}\n", "entries 1 and 2 are the same"),
    ],
)
def test_booleans_and_duplicate_sources_are_refused(tmp_path, text, match):
    """`weight: true` read as 1.0; a source listed twice was drawn twice while the table showed
    each half's small epoch count."""
    with pytest.raises(UserError, match=match):
        BlendConfig.from_yaml(write(tmp_path / "bad.yaml", text))
