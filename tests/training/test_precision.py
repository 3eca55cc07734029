"""bf16 (ZeRO-1) resume, fp16 refused on CPU, activation checkpointing, continued pretraining."""

from __future__ import annotations

import pytest

from tests.training.helpers import losses, metrics, run_train


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["parallel.pp=2", "parallel.tp=2"])
def test_bf16_pipeline_resume_is_exact(layout, fi_dataset, tmp_path):
    """bf16 accumulates gradients in fp32 (DeepSpeed's BF16_Optimizer at ZeRO-1, the bf16
    default): its optimizer files reload exactly, across pipeline stages and TP ranks."""
    args = (
        "train.precision=bf16",
        layout,
        "train.iterations=6",
        "checkpoint.interval=3",
        "checkpoint.keep=5",
    )
    run_train("bloom", fi_dataset, tmp_path / "ref", *args, nproc=2)
    ref = losses(tmp_path / "ref")
    assert ref[6] < ref[1]
    ckpt = tmp_path / "ref"
    (ckpt / "latest").write_text("iter_0000003")  # as if killed after the step-3 save
    import shutil

    shutil.rmtree(ckpt / "iter_0000006")
    proc = run_train("bloom", fi_dataset, ckpt, *args, nproc=2)
    assert "loaded checkpoint" in proc.stderr
    assert losses(ckpt) == ref
    assert list(ckpt.glob("iter_0000006/bf16_zero_pp_rank_0_mp_rank_0*_optim_states.pt"))


def test_fp16_on_cpu_is_a_clear_error(fi_dataset, tmp_path):
    proc = run_train("bloom", fi_dataset, tmp_path, "train.precision=fp16", check=False)
    assert proc.returncode == 2
    assert "has no fp16; use bf16" in proc.stderr


@pytest.mark.distributed
def test_activation_checkpointing_is_bit_identical(fi_dataset, tmp_path):
    """none, selective (the attention core recomputed), full and every-k recompute give the
    same losses at (pp, tp, dp) = (2, 2, 1)."""
    common = ("parallel.pp=2", "parallel.tp=2", "train.iterations=4", "checkpoint.interval=100")
    got = {}
    for mode in ("none", "selective", "full", "every"):
        ckpt = tmp_path / mode
        run_train(
            "llama",
            fi_dataset,
            ckpt,
            *common,
            f"train.activation_checkpointing={mode}",
            "train.checkpoint_every_layers=2",
            nproc=4,
        )
        got[mode] = losses(ckpt)
    assert got["full"] == got["none"] == got["every"] == got["selective"]


def test_reset_progress_loads_weights_only(fi_dataset, tmp_path):
    run_train("bloom", fi_dataset, tmp_path / "base", "train.iterations=8", "checkpoint.interval=8")
    base = losses(tmp_path / "base")
    cont = tmp_path / "cont"
    proc = run_train(
        "bloom",
        fi_dataset,
        cont,
        f"checkpoint.load={tmp_path / 'base'}",
        "train.iterations=3",
        "optim.lr=1e-3",
        "optim.warmup_iters=3",
        "--reset-progress",
    )
    assert "weights only" in proc.stderr
    rows = metrics(cont)
    assert [r["step"] for r in rows] == [1, 2, 3]  # iteration reset
    assert rows[0]["lr"] == pytest.approx(1e-3 / 3)  # new schedule from its start
    assert rows[0]["loss"] < base[1] - 0.1  # trained weights, not a fresh init
    assert (cont / "iter_0000003" / "config.yaml").is_file()
    # a restart of the continued run resumes its own checkpoint (no second reset)
    again = run_train(
        "bloom",
        fi_dataset,
        cont,
        f"checkpoint.load={tmp_path / 'base'}",
        "train.iterations=4",
        "optim.lr=1e-3",
        "optim.warmup_iters=3",
        "--reset-progress",
    )
    assert f"loaded checkpoint {cont / 'iter_0000003'}" in again.stderr
    assert [r["step"] for r in metrics(cont)] == [1, 2, 3, 4]
