"""Unit tests of the training pieces, without a model run (the stop agreement uses 3 gloo ranks)."""

from __future__ import annotations

import pytest
import torch

from megatron_ext.config import from_dict
from megatron_ext.models import get_preset
from megatron_ext.training.config import RunConfig
from megatron_ext.training.engine import build_optimizer, deepspeed_config
from megatron_ext.training.metrics import MetricsWriter, read_metrics
from megatron_ext.training.pipeline import layer_param_counts, partition_report
from megatron_ext.training.schedule import learning_rate
from megatron_ext.training.spikes import SkippableAdamW


def test_partition_by_parameters_counts_embedding_and_head():
    model = get_preset("tiny")
    model.num_layers = 6
    counts = layer_param_counts(model, 1)
    assert counts[0] == counts[-1] > counts[1]  # tied logits count the embedding again
    report = partition_report(model, 2, 1, "parameters")
    assert report.parts[0] == 0 and report.parts[-1] == len(counts)
    assert abs(report.params[0] - report.params[1]) <= max(counts)
    by_type = partition_report(model, 2, 1, "type")
    assert by_type.names[by_type.parts[1] - 1] == "block3"  # 3 blocks per stage
    assert "stage 1: layers" in by_type.format()
    half = layer_param_counts(model, 2)
    assert half[1] < counts[1]  # TP-split weights divided


def test_optimizer_has_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = RunConfig()
    opt = build_optimizer(model, cfg)
    assert type(opt) is SkippableAdamW and isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == cfg.optim.weight_decay and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3


def test_deepspeed_config_is_zero1_with_clipping():
    cfg = from_dict(
        RunConfig,
        {
            "train": {"global_batch_size": 16, "micro_batch_size": 2, "precision": "bf16"},
            "optim": {"clip_grad": 0.5},
        },
    )
    ds = deepspeed_config(cfg, dp_size=2)
    assert ds["zero_optimization"] == {"stage": 1}
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "optimizer" not in ds


def test_bloom_schedule_cosine_to_min():
    cfg = from_dict(RunConfig, {"optim": {"lr": 6e-5, "min_lr": 6e-6, "warmup_iters": 10}})
    assert learning_rate(0, cfg.optim, 100) == pytest.approx(6e-6)
    assert learning_rate(9, cfg.optim, 100) == pytest.approx(6e-5)
    assert learning_rate(100, cfg.optim, 100) == pytest.approx(6e-6)


def test_metrics_resume_truncates_later_rows(tmp_path):
    w = MetricsWriter(str(tmp_path), True, False)
    for step in range(1, 6):
        w.write({"step": step, "loss": 1.0 / step})
    MetricsWriter(str(tmp_path), True, False, resume_step=3)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def _stop_reasons(rank, world_size):
    """Only the last rank has a reason (here: it got SIGUSR1); every rank stops and says why."""
    import signal

    from megatron_ext.training.stopping import StopConditions
    from megatron_ext.training.trainer import _stop_reason

    stop = StopConditions()
    first = _stop_reason(stop)  # nobody has a reason yet
    if rank == world_size - 1:
        stop.signal_received = signal.SIGUSR1
    return first, _stop_reason(stop)


@pytest.mark.distributed
def test_every_rank_stops_with_the_reason_of_the_rank_that_had_one():
    from tests.distributed_utils import run_distributed_test

    results = run_distributed_test(_stop_reasons, 3)
    assert [first for first, _ in results] == [None, None, None]
    assert [then for _, then in results] == [
        "signal SIGUSR1 (on rank 2)", "signal SIGUSR1 (on rank 2)", "signal SIGUSR1",
    ]  # fmt: skip


def test_exit_duration_counts_from_process_start():
    """The budget covers start-up (engine build, checkpoint load), not only the loop."""
    import time

    import psutil

    from megatron_ext.training.stopping import StopConditions

    age = time.time() - psutil.Process().create_time()  # this pytest process: seconds old
    assert age > 2
    assert StopConditions(exit_duration_mins=(age - 1) / 60).local_reason().startswith("exit")
    assert StopConditions(exit_duration_mins=(age + 60) / 60).local_reason() is None


def test_a_collective_failure_in_a_save_is_named_and_other_errors_pass():
    from types import SimpleNamespace

    from megatron_ext.training.trainer import CollectiveError, _collectives_named

    ctx = SimpleNamespace(rank=3, pp_rank=1, pp_size=2, tp_rank=1, dp_rank=0)
    engine = SimpleNamespace(ctx=ctx, ds=None)
    phase = "the checkpoint save of iter_0000004"
    with pytest.raises(CollectiveError) as info:
        with _collectives_named(engine, 4, phase):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Timed out waiting 10000ms")
    text = str(info.value)
    assert "step 4: rank 3 (pipeline stage 1/2, tp 1, dp 0) failed in a collective" in text
    assert f"during {phase}: [gloo" in text
    for other in (RuntimeError("No space left on device"), ValueError("timed out")):
        with pytest.raises(type(other)) as info:
            with _collectives_named(engine, 4, phase):
                raise other
        assert info.value is other  # not disguised as a peer's failure


def test_adamw_is_fused_on_gpus_only():
    import torch

    from megatron_ext.config import from_dict
    from megatron_ext.training.config import RunConfig

    cfg = from_dict(RunConfig, {"data": {"path": "x"}})
    model = torch.nn.Linear(4, 4)
    assert build_optimizer(model, cfg, torch.device("cuda", 0)).defaults["fused"] is True
    assert not build_optimizer(model, cfg, torch.device("cpu")).defaults["fused"]
