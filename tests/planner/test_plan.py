"""Layout proposals: BLOOM-176B on 48 nodes of 8 A100-80GB, refusals, the CLI."""

from __future__ import annotations

import json

import pytest

from megatron_ext.cli import main
from megatron_ext.models.presets import get_preset
from megatron_ext.planner.plan import PlanRequest, accepted, plan


@pytest.fixture(scope="module")
def bloom_plan():
    req = PlanRequest(
        model=get_preset("bloom-176b"), nodes=48, devices_per_node=8, device_memory_gb=80,
        seq_length=2048, global_batch_size=2048, precision="bf16",
    )  # fmt: skip
    return plan(req)


def _find(cands, tp, pp, dp, mbs, rc):
    (c,) = [c for c in cands if (c.layout.tp, c.layout.pp, c.layout.dp,
            c.layout.micro_batch_size, c.layout.recompute) == (tp, pp, dp, mbs, rc)]  # fmt: skip
    return c


def test_bloom_176b_layout_is_accepted(bloom_plan):
    good = accepted(bloom_plan)
    bloom = _find(good, 4, 12, 8, 2, "full")  # BLOOM's own: TP=4 PP=12 DP=8, mbs 2, recompute
    assert 30 < bloom.estimate.total / 2**30 < 72
    # Without recompute the same layout does not fit 80 GB (BLOOM trained with it on).
    assert not _find(bloom_plan, 4, 12, 8, 2, "none").fits
    assert all(c.layout.world_size == 384 for c in good)


def test_bloom_176b_refusals_say_why(bloom_plan):
    no_tp = _find(bloom_plan, 1, 3, 128, 1, "full")  # ~59B parameters per device
    assert not no_tp.fits and no_tp.reasons[0].startswith("needs")
    too_deep = _find(bloom_plan, 4, 96, 1, 1, "full")
    assert too_deep.reasons == ["pp=96 exceeds 70 layers"]
    batch = _find(bloom_plan, 4, 32, 3, 1, "none")
    assert "global batch 2048 not divisible" in batch.reasons[0]
    assert all(c.layout.tp <= 8 for c in bloom_plan)  # tensor parallelism stays in a node


def test_small_model_needs_no_model_parallelism():
    req = PlanRequest(model=get_preset("fingpt-186m"), nodes=1, devices_per_node=8,
                      device_memory_gb=64, seq_length=2048, global_batch_size=256)  # fmt: skip
    best = accepted(plan(req))[0]
    assert (best.layout.tp, best.layout.pp, best.layout.dp) == (1, 1, 8)
    assert best.layout.recompute == "none"


def test_plan_cli(capsys):
    rc = main(["plan", "--model", "bloom-176b", "--profile", "nvidia", "--nodes", "48",
               "--global-batch", "2048", "--top", "100"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "176.25B parameters" in out and "proposed: " in out
    assert "memory per device" in out and "run config:" in out
    assert any(line.split()[:5] == ["4", "12", "8", "2", "full"] for line in out.splitlines())
    # 176.25e9 (tp-padded vocabulary) x 14 bytes: BLOOM's "2.3 TB with optimizer states";
    # 247 s at the profile's 10 GB/s, inside its 600 s signal margin (no warning)
    assert "checkpoint: 2,467.5 GB" in out and "~247 s at 10 GB/s" in out
    assert "warning" not in out


def test_save_time_warnings():
    from megatron_ext.planner.checkpoint_io import save_report

    ok = save_report(2.4e12, 20, 600, 3600)
    assert ok["save_s"] == 120.0 and not ok["warnings"]
    slow = save_report(2.4e12, 2, 600, 1000)  # 1200 s: past the margin and the save timeout
    assert len(slow["warnings"]) == 2
    assert "signal margin" in slow["warnings"][0] and "save_timeout_s" in slow["warnings"][1]


def test_plan_cli_json_and_no_fit(capsys):
    rc = main(["plan", "--model", "bloom-176b", "--profile", "local", "--nodes", "1", "--json"])
    assert rc == 1  # 176B on one 4 GB CPU task
    rows = json.loads(capsys.readouterr().out)
    assert rows and not any(r["fits"] for r in rows)
    rc = main(["plan", "--model", "bloom-176b", "--profile", "local", "--nodes", "1"])
    assert rc == 1 and "no layout fits" in capsys.readouterr().out
