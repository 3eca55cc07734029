"""A checkpoint saved at one (tp, pp, dp) resumes at another through DeepSpeed's universal
checkpoint (weights, ZeRO-1 optimizer state, schedule): the next steps' losses equal the
uninterrupted run's to fp32 tolerance. Traps: universal_checkpoint_info in client_state, and
`latest_universal` written by us (megatron_ext.training.universal)."""

from __future__ import annotations

import shutil

import pytest

from tests.training.helpers import losses, run_train


@pytest.mark.distributed
@pytest.mark.parametrize(
    "family,before,after", [("bloom", (1, 1, 1), (2, 2, 2)), ("llama", (2, 2, 1), (1, 1, 2))]
)
def test_resume_at_another_layout(family, before, after, fi_dataset, tmp_path):
    common = (
        "train.iterations=8",
        "checkpoint.interval=4",
        "checkpoint.keep=5",
        "train.micro_batch_size=2",
    )

    def layout(pp, tp, dp):
        return (f"parallel.pp={pp}", f"parallel.tp={tp}"), pp * tp * dp

    args, nproc = layout(*before)
    ckpt = tmp_path / "run"
    run_train(family, fi_dataset, ckpt, *common, *args, nproc=nproc)
    ref = losses(ckpt)
    shutil.rmtree(ckpt / "iter_0000008")
    (ckpt / "latest").write_text("iter_0000004")

    args, nproc = layout(*after)
    proc = run_train(family, fi_dataset, ckpt, *common, *args, nproc=nproc)
    assert "via a universal checkpoint" in proc.stderr
    assert (ckpt / "latest_universal").read_text() == "iter_0000004_universal"
    got = losses(ckpt)
    for step in range(5, 9):
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step


def test_unsupported_tp_change_is_refused(fi_dataset, tmp_path):
    from megatron_ext.errors import UserError
    from megatron_ext.training.universal import needs_universal

    ckpt = tmp_path / "run"
    # tiny-llama has 2 kv heads: TP=4 would split a kv group's fused QKV rows
    run_train("llama", fi_dataset, ckpt, "train.iterations=1", "checkpoint.interval=1")
    with pytest.raises(UserError, match="kv heads"):
        needs_universal(str(ckpt), 4, 1, 1)
    assert needs_universal(str(ckpt), 1, 1, 1) is None
    assert needs_universal(str(ckpt), 2, 1, 1) == "iter_0000001"
