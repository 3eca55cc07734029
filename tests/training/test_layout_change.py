"""A checkpoint saved at one (tp, pp, dp) resumes at another through DeepSpeed's universal
checkpoint (weights, ZeRO-1 optimizer state, schedule), made offline first by `convert reshard
--with-optimizer --universal` (`train` refuses the unconverted change naming that command): the
next steps' losses equal the uninterrupted run's to fp32 tolerance. Traps:
universal_checkpoint_info in client_state, and `latest_universal` written by us."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.training.helpers import env, losses, run_train


def convert_offline(ckpt, workers: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_ext", "convert", "reshard", "--with-optimizer",
           "--checkpoint", str(ckpt), "--universal", "--workers", str(workers)]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


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
    refused = run_train(family, fi_dataset, ckpt, *common, *args, nproc=nproc, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    command = f"megatron-ext convert reshard --with-optimizer --checkpoint {ckpt} --universal"
    assert command in refused.stderr
    assert not (ckpt / "iter_0000004_universal").exists()  # nothing converted inside the job
    convert_offline(ckpt, workers=2)
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


@pytest.mark.distributed
@pytest.mark.parametrize("family,tp_before,tp_after", [("bloom", 1, 2), ("llama", 2, 1)])
def test_tp_change_with_other_vocab_padding(family, tp_before, tp_after, fi_dataset, tmp_path):
    """vocab 1000 padded to a multiple of 96 x tp: 1056 rows at tp=1, 1152 at tp=2. The
    universal checkpoint drops the padding rows (weights and Adam moments) and the load pads
    them again with zeros, which is what our init gives them and what they keep in training
    (their logits are masked out of the loss, so their gradients are zero)."""
    import torch

    from megatron_ext.models.presets import resolve_model_config

    divisible = "model.make_vocab_size_divisible_by=96"
    model = resolve_model_config(
        {
            "preset": "tiny" if family == "bloom" else "tiny-llama",
            "make_vocab_size_divisible_by": 96,
        }
    )
    padded = {tp: model.padded_vocab_size(tp) for tp in (tp_before, tp_after)}
    assert padded[1] == 1056 and padded[2] == 1152
    common = ("train.iterations=6", "checkpoint.interval=3", "checkpoint.keep=5", divisible)
    ckpt = tmp_path / "run"
    run_train(family, fi_dataset, ckpt, *common, f"parallel.tp={tp_before}", nproc=tp_before)
    ref = losses(ckpt)
    shutil.rmtree(ckpt / "iter_0000006")
    (ckpt / "latest").write_text("iter_0000003")

    convert_offline(ckpt)
    proc = run_train(family, fi_dataset, ckpt, *common, f"parallel.tp={tp_after}", nproc=tp_after)
    assert "via a universal checkpoint" in proc.stderr
    got = losses(ckpt)
    for step in range(4, 7):
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step

    # each checkpoint holds its own padding; the padding rows stay zero across the change
    for tag, tp in (("iter_0000003", tp_before), ("iter_0000006", tp_after)):
        full = _vocab_rows(ckpt / tag, family, tp)
        assert full.shape[0] == padded[tp], tag
        assert torch.count_nonzero(full[model.vocab_size :]) == 0, tag
        assert torch.count_nonzero(full[: model.vocab_size].abs().sum(1)) == model.vocab_size


def _vocab_rows(tag_dir, family: str, tp_size: int):
    """The full (all TP ranks) embedding or output weight saved in a checkpoint directory."""
    import torch

    name = "word_embeddings.weight" if family == "bloom" else "output_layer.weight"
    shards = {}  # tp rank -> its rows (files are layer_XX-model_<tp rank>-model_states.pt)
    for path in sorted(tag_dir.glob("layer_*-model_*-model_states.pt")):
        tp_rank = int(path.name.split("-")[1].removeprefix("model_"))
        for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            if key.endswith(name):
                shards.setdefault(tp_rank, tensor)
    assert sorted(shards) == list(range(tp_size)), (tag_dir, sorted(shards))
    return torch.cat([shards[r] for r in range(tp_size)])
