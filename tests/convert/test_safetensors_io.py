"""Streaming HF I/O: weights-only pickles, atomic output, shard plans, and peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.convert import driver
from megatron_ext.convert.safetensors_io import (
    HFCheckpoint,
    TensorSpec,
    parse_size,
    plan_shards,
)
from megatron_ext.errors import UserError
from megatron_ext.models import get_family, get_preset

REPO = Path(__file__).resolve().parents[2]


class NotATensor:  # pickled by reference: loading it needs arbitrary unpickling
    pass


def test_bin_checkpoints_load_weights_only(tmp_path):
    torch.save({"a.weight": torch.arange(6.0).reshape(2, 3)}, tmp_path / "pytorch_model.bin")
    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.kind == "bin" and ckpt.specs()["a.weight"].shape == (2, 3)
    assert torch.equal(ckpt.get("a.weight"), torch.arange(6.0).reshape(2, 3))


def test_pickle_needing_arbitrary_unpickling_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "extra": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="arbitrary unpickling.*can run code"):
        HFCheckpoint(tmp_path)


def test_failed_conversion_leaves_nothing_under_the_final_name(tmp_path):
    config, family = get_preset("tiny"), get_family("bloom")
    specs = [TensorSpec(f"t{i}", torch.float32, (1000,)) for i in range(4)]

    def tensors():
        yield "t0", torch.zeros(1000)
        yield "t1", torch.zeros(1000)
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        driver.write_hf(tmp_path / "out", tensors(), specs, family, config, max_shard_size=4000)
    assert os.listdir(tmp_path) == []  # neither the final dir nor the temp dir


def test_shard_plan_and_sizes():
    specs = [TensorSpec(str(i), torch.bfloat16, (n,)) for i, n in enumerate([10, 10, 30, 5])]
    assert [[s.name for s in shard] for shard in plan_shards(specs, 40)] == [
        ["0", "1"],
        ["2"],
        ["3"],
    ]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2**31
    with pytest.raises(UserError, match="max-shard-size"):
        parse_size("lots")


def probe(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.convert.rss_probe", *args],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}


def test_peak_memory_is_a_few_tensors_not_the_model(tmp_path):
    """Converting a synthetic Llama checkpoint both ways stays below 4x its largest tensor
    (increase of peak RSS over the RSS after imports, measured in a fresh process).

    CI runs the smallest size these shapes allow (~0.7 GB: one block, the 262 MB embedding
    and output layer) to keep the test under ~20 s on a loaded CI machine;
    MEGATRON_EXT_CONVERT_RSS_GB=2.3 runs the >= 2 GB case (a 2.33 GB checkpoint, 9 blocks,
    measured once: peak RSS growth 509 MB from-hf at tp=2, 609 MB to-hf; largest tensor 262 MB).
    """
    size = os.environ.get("MEGATRON_EXT_CONVERT_RSS_GB", "0.3")
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    probe("make", str(hf), size)
    for result in (probe("from-hf", str(hf), str(ckpt), "2"), probe("to-hf", str(ckpt), str(out))):
        growth = result["peak_rss"] - result["baseline_rss"]
        assert growth < 4 * result["largest_tensor"], result
