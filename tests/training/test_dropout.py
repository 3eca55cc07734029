"""Dropout in training: attention dropout used to raise KeyError (the TP RNG tracker was never
seeded). Masks differ across TP ranks where the tensors do, repeat after a resume, and are
replayed by activation recomputation."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.distributed_utils import run_distributed_test
from tests.training.helpers import losses, run_train

DROPOUT = ("model.attention_dropout=0.2", "model.hidden_dropout=0.1")
COMMON = ("parallel.tp=2", "train.iterations=4", "checkpoint.interval=2", "checkpoint.keep=3")


@pytest.mark.distributed
def test_dropout_trains_resumes_exactly_and_survives_recompute(fi_dataset, tmp_path):
    run_train("bloom", fi_dataset, tmp_path / "ref", *COMMON, *DROPOUT, nproc=2)
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == [1, 2, 3, 4]
    run_train("bloom", fi_dataset, tmp_path / "plain", *COMMON, nproc=2)
    assert losses(tmp_path / "plain")[1] != ref[1]  # the dropout did something
    # resume from step 2: the default generator and the TP tracker come back with it
    ckpt = tmp_path / "ref"
    (ckpt / "latest").write_text("iter_0000002")
    shutil.rmtree(ckpt / "iter_0000004")
    proc = run_train("bloom", fi_dataset, ckpt, *COMMON, *DROPOUT, nproc=2)
    assert "loaded checkpoint" in proc.stderr
    assert losses(ckpt) == ref
    # full recomputation replays the forward's masks (tracker states restored in backward)
    run_train(
        "bloom", fi_dataset, tmp_path / "recompute", *COMMON, *DROPOUT,
        "train.activation_checkpointing=full", nproc=2,
    )  # fmt: skip
    assert losses(tmp_path / "recompute") == pytest.approx(ref, abs=1e-6)


def _masks(rank, world_size, tmp):
    import torch.nn.functional as F

    from megatron_ext.config import from_dict
    from megatron_ext.models.presets import resolve_model_config
    from megatron_ext.training.config import RunConfig
    from megatron_ext.training.engine import build_engine, init_distributed

    init_distributed(60.0)
    cfg = from_dict(
        RunConfig,
        {
            "model": {"preset": "tiny", "num_layers": 1, "attention_dropout": 0.5},
            "parallel": {"tp": 2},
            "data": {"path": "unused", "seq_length": 16},
            "train": {"micro_batch_size": 1, "global_batch_size": 1},
            "checkpoint": {"dir": tmp},
        },
    )
    model = resolve_model_config(cfg.model)
    model.seq_length = 16
    engine = build_engine(cfg, model)
    ones = torch.ones(64)
    with engine.ctx.rng.fork():
        split = F.dropout(ones, 0.5)  # TP-split tensors: heads, SP shards
    replicated = F.dropout(ones, 0.5)  # the residual stream without SP
    return split, replicated


@pytest.mark.distributed
def test_tp_ranks_draw_their_own_masks_for_split_tensors(tmp_path):
    (split0, rep0), (split1, rep1) = run_distributed_test(_masks, 2, str(tmp_path))
    assert not torch.equal(split0, split1)
    assert torch.equal(rep0, rep1)


@pytest.mark.gpu
def test_tracker_forks_the_bound_gpu_generator():
    """On a GPU the tracker's states are CUDA generator states of this rank's device."""
    import torch.nn.functional as F

    from megatron_ext.parallel.context import ParallelContext

    ctx = ParallelContext.single(torch.device("cuda", torch.cuda.current_device()))
    ctx.seed(1234)
    ones = torch.ones(4096, device=ctx.device)
    with ctx.rng.fork():
        first = F.dropout(ones, 0.5)
    state = ctx.rng.get_states()
    with ctx.rng.fork():
        second = F.dropout(ones, 0.5)
    ctx.rng.set_states(state)
    with ctx.rng.fork():
        again = F.dropout(ones, 0.5)
    assert not torch.equal(first, second) and torch.equal(second, again)
