"""The planner's estimate against the measured peak of a real `megatron-ext train` on CPU.

Two shapes, one process and TP=2 on two processes: rank 0's resident-set growth from just
before the model is built to the peak of 3 steps (validate.measure_run) must be within 20% of
the estimate of its stage, and the mean time of steps 2-3 within 25% of the throughput model's
prediction with this CPU's constants (planner/cpu_device.py; measured again for a second try
when the first misses: CI machines are shared). Figures for more shapes:
benchmarks/results/planner.md.
"""

from __future__ import annotations

import pytest

from megatron_ext.planner.validate import measure_run
from tests.training.helpers import TINY

pytestmark = pytest.mark.distributed

SHAPES = {
    "h512-L4-s256-b4": (1, ["model.hidden_size=512", "model.num_layers=4",
                            "data.seq_length=256", "train.micro_batch_size=4"]),
    "tp2-h512-L4-s256-b4": (2, ["parallel.tp=2", "model.hidden_size=512", "model.num_layers=4",
                                "data.seq_length=256", "train.micro_batch_size=4"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_estimate_within_20_percent_of_measured_peak(name, tmp_path, fi_dataset):
    nproc, shape = SHAPES[name]
    overrides = [*shape, "model.num_attention_heads=8", "train.global_batch_size=8",
                 "train.iterations=3"]  # fmt: skip
    from megatron_ext.planner import cpu_device

    for attempt in range(2):  # a shared CI machine: load that comes and goes between the
        # CPU's calibration and the run skews the comparison; a second try, calibrated again
        cpu = cpu_device.measure(ranks=nproc)  # this CPU's constants for the throughput model
        m = measure_run(TINY["bloom"], fi_dataset, tmp_path / f"ckpt{attempt}", overrides, nproc,
                        timeout=400, cpu=cpu)  # fmt: skip
        if abs(m.step_error) <= 0.25:
            break
    # the step time the planner predicts with them (issue 18: within 25% on CPU)
    assert abs(m.step_error) <= 0.25, (
        f"{name}: predicted step {m.step_predicted_s:.3f} s vs measured "
        f"{m.step_measured_s:.3f} s ({m.step_error:+.1%}); CPU {cpu[0]}, links {cpu[1]}"
    )
    assert m.measured > 100 * 2**20  # the model is big enough for RSS to mean something
    assert abs(m.error) <= 0.2, (
        f"{name}: estimate {m.estimate / 2**20:.0f} MiB vs measured {m.measured / 2**20:.0f} MiB "
        f"({m.error:+.1%}); breakdown {m.breakdown.as_gib()}"
    )
