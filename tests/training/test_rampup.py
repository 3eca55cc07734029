"""Batch-size ramp-up (`train.rampup_batch_size: [start, increment, samples]`, as Megatron's
--rampup-batch-size): the schedule, its refusals, and real runs.

Runs: micro-batch 1, global 8, ramp-up [2, 2, 12] gives global batches 2, 2, 4, 6, 8, 8.
- dp=2, stopped after 3 steps and resumed, equals an uninterrupted dp=1 run (1e-5): the number
  of micro-batches per step follows the schedule at both layouts and across the resume.
- its first two steps equal a run without ramp-up at global batch 2 (same samples, same lr).
"""

from __future__ import annotations

import pytest

from megatron_ext.config import from_dict
from megatron_ext.errors import UserError
from megatron_ext.training.config import RunConfig
from megatron_ext.training.schedule import global_batch_size
from tests.training.helpers import losses, metrics, run_train

RAMP = ["train.micro_batch_size=1", "train.global_batch_size=8", "train.rampup_batch_size=[2,2,12]"]
SIZES = [2, 2, 4, 6, 8, 8]


def _cfg(**train) -> RunConfig:
    return from_dict(RunConfig, {"data": {"path": "x"}, "train": train})


def test_schedule_follows_megatron():
    cfg = _cfg(micro_batch_size=1, global_batch_size=8, rampup_batch_size=[2, 2, 12])
    consumed, sizes = 0, []
    for _ in range(6):
        sizes.append(global_batch_size(consumed, cfg.train))
        consumed += sizes[-1]
    assert sizes == SIZES
    assert cfg.grad_accumulation_steps(2) == 4  # the full batch; the ramp-up is valid at dp=2
    flat = _cfg(micro_batch_size=1, global_batch_size=8, rampup_batch_size=[8, 2, 100])
    assert global_batch_size(0, flat.train) == 8  # start == global: no ramp


@pytest.mark.parametrize(
    ("ramp", "dp", "needle"),
    [
        ([2, 2], 1, "[start, increment, samples]"),
        ([0, 2, 12], 1, "all >= 1"),
        ([10, 2, 12], 1, "start must be <= global_batch_size 8"),
        ([2, 4, 12], 1, "multiple of increment"),
        ([2, 2, 12], 4, "micro_batch_size x dp = 1 x 4 = 4"),
    ],
)
def test_bad_rampup_is_refused(ramp, dp, needle):
    cfg = _cfg(micro_batch_size=1, global_batch_size=8, rampup_batch_size=ramp)
    with pytest.raises(UserError) as err:
        cfg.grad_accumulation_steps(dp)
    assert needle in str(err.value) and "train.rampup_batch_size" in str(err.value)


@pytest.mark.distributed
def test_rampup_runs_equal_across_dp_and_resume(fi_dataset, tmp_path):
    common = [*RAMP, "checkpoint.interval=3"]
    ref = tmp_path / "dp1"
    run_train("bloom", fi_dataset, ref, *common, "train.iterations=6")
    rows = metrics(ref)
    assert [r["global_batch_size"] for r in rows] == SIZES
    assert [r["consumed_samples"] for r in rows] == [sum(SIZES[: i + 1]) for i in range(6)]

    dp2 = tmp_path / "dp2"
    run_train("bloom", fi_dataset, dp2, *common, "train.iterations=3", nproc=2)
    proc = run_train("bloom", fi_dataset, dp2, *common, "train.iterations=6", nproc=2)
    assert f"loaded checkpoint {dp2 / 'iter_0000003'}" in proc.stderr
    assert [r["global_batch_size"] for r in metrics(dp2)] == SIZES
    got, want = losses(dp2), losses(ref)
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, got, want)

    small = tmp_path / "gbs2"
    run_train("bloom", fi_dataset, small, "train.micro_batch_size=1",
              "train.global_batch_size=2", "train.iterations=2", "optim.decay_iters=6")  # fmt: skip
    first = losses(small)
    for step in (1, 2):
        assert first[step] == pytest.approx(want[step], abs=1e-6), (step, first, want)
