"""`megatron-ext rehearse` (issue 17): the start-up and checkpoint layout of a run at its real
world size, walked in one process on torch's fake process group; inconsistencies exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.helpers import ROOT, run_train

BLUUMI = ROOT / "examples" / "gpu" / "bluumi-176b.yaml"
FINGPT_13B = ROOT / "examples" / "gpu" / "fingpt-13b.yaml"
TINY = ROOT / "examples" / "tiny_bloom.yaml"


def rehearse(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_ext", "rehearse", *args]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_bloom_176b_on_384_ranks_is_consistent():
    """BLOOM's own layout (TP=4, PP=12, DP=8) on 48 LUMI nodes: every rank walked in < 2 min."""
    proc = rehearse("--config", str(BLUUMI), "--world-size", "384", "--profile", "lumi", "--json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["problems"] == []
    ranks = out["ranks"]
    assert [r["rank"] for r in ranks] == list(range(384))
    assert {(r["pp"], r["dp"], r["tp"]) for r in ranks} == {
        (p, d, t) for p in range(12) for d in range(8) for t in range(4)
    }
    # 70 blocks over 12 stages: 5 on the first and the last (they hold the 250,880 x 14336
    # embedding and its tied copy), 6 on the others (examples/gpu/bluumi-176b.yaml)
    blocks = [s["layers"][1] - s["layers"][0] for s in out["stages"]]
    assert blocks[0] == 6 and blocks[-1] == 7 and set(blocks[1:-1]) == {6}  # + embedding/norm
    # the checkpoint: ~2.5 TB over 1104 distinct files, as `plan` predicts (14 bytes/param,
    # plus the tied embedding saved by both end stages)
    from megatron_ext.models.presets import resolve_model_config
    from megatron_ext.planner.checkpoint_io import checkpoint_bytes

    files = [f for r in ranks for f in r["files"]]
    assert len({name for name, _ in files}) == len(files)
    total = sum(size for _, size in files)
    predicted = checkpoint_bytes(resolve_model_config("bloom-176b"), 4, "bf16")
    assert 1.0 <= total / predicted < 1.05, (total, predicted)
    assert max(r["memory_gib"] for r in ranks) < 64 * 0.9


def test_fingpt_13b_on_128_lumi_nodes_is_consistent():
    """FinGPT-13B (TP=2, PP=4) on 128 LUMI-G nodes x 8 GCDs: 1024 ranks, DP=128."""
    proc = rehearse("--config", str(FINGPT_13B), "--world-size", "1024", "--profile", "lumi")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rehearsal of 1024 ranks: tp=2 pp=4 dp=128" in proc.stdout
    assert "consistent:" in proc.stdout
    seconds = float(proc.stdout.split(", in ")[1].split(" s")[0])
    assert seconds < 120


def test_each_kind_of_inconsistency_exits_1():
    """A stage over its memory budget, and a TP group split across nodes (one task per node)."""
    over = rehearse("--config", str(TINY), "--world-size", "8", "parallel.tp=2", "parallel.pp=2",
                    "--device-memory-gb", "0.001")  # fmt: skip
    assert over.returncode == 1
    assert "pipeline stage 0 needs about" in over.stdout and "over the budget" in over.stdout
    split = rehearse("--config", str(TINY), "--world-size", "4", "parallel.tp=2",
                     "--profile", "local")  # fmt: skip
    assert split.returncode == 1
    assert "the tp group of rank 0 [0, 1] spans nodes" in split.stdout
    bad = rehearse("--config", str(TINY), "--world-size", "6", "parallel.tp=4")
    assert bad.returncode == 2 and "not a multiple of tp x pp = 4" in bad.stderr


def test_a_missing_swiglu_rule_is_found(monkeypatch):
    """Llama's fc1 shards are [gate_r; up_r]: without its 2-sub-parameter rule the merge would
    interleave gate and up rows."""
    from megatron_ext import checkpoint_format
    from megatron_ext.training import rehearse as rh

    real = checkpoint_format.universal_info
    monkeypatch.setattr(
        checkpoint_format, "universal_info",
        lambda model: {k: v for k, v in real(model).items() if "2_sub_params" not in k},
    )  # fmt: skip
    cfg = rh.load_config(str(ROOT / "examples" / "tiny_llama.yaml"), ["parallel.tp=2"])
    result = rh.rehearse(cfg, 2, tasks_per_node=2, budget_bytes=None)
    assert any("linear_fc1.weight: SwiGLU" in p for p in result.problems), result.problems
    monkeypatch.setattr(checkpoint_format, "universal_info", real)
    assert rh.rehearse(cfg, 2, tasks_per_node=2, budget_bytes=None).problems == []


def test_a_wrong_universal_rule_is_found(monkeypatch):
    """Without the row-parallel patterns the universal merge would concatenate the dim-1 shards
    of linear_proj / linear_fc2 along dim 0: reported per parameter."""
    from deepspeed.checkpoint import constants as c

    from megatron_ext import checkpoint_format
    from megatron_ext.training import rehearse as rh

    real = checkpoint_format.universal_info

    def broken(model):
        info = real(model)
        info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS] = []
        return info

    monkeypatch.setattr(checkpoint_format, "universal_info", broken)
    cfg = rh.load_config(str(TINY), ["parallel.tp=2", "parallel.pp=2"])
    result = rh.rehearse(cfg, 4, tasks_per_node=4, budget_bytes=None)
    assert any("linear_proj.weight: split along dim 1" in p for p in result.problems)
    assert any("linear_fc2.weight: split along dim 1" in p for p in result.problems)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["parallel.tp=2 parallel.pp=2", "parallel.pp=2"])
def test_rehearsed_files_are_the_files_a_real_run_writes(layout, fi_dataset, tmp_path):
    """The file names the rehearsal derives for 4 ranks (tp=2 pp=2, and pp=2 dp=2) are exactly
    those a real run saves, and the layer files' sizes are the parameters' bytes (+ pickling)."""
    ckpt = tmp_path / "real"
    args = (*layout.split(), "train.iterations=1")
    run_train("bloom", fi_dataset, ckpt, *args, nproc=4)
    from megatron_ext.training import rehearse as rh

    cfg = rh.load_config(str(TINY), list(args))
    result = rh.rehearse(cfg, 4, tasks_per_node=4, budget_bytes=None)
    assert result.problems == []
    predicted = {name: size for r in result.rows for name, size in r["files"]}
    tag = Path(ckpt) / "iter_0000001"
    written = {p.name: p.stat().st_size for p in tag.glob("*.pt")}
    assert set(predicted) == set(written)
    for name, size in predicted.items():
        if name.startswith("layer_") and size:
            assert size <= written[name] < size + 8192, name
