"""A checkpoint directory whose checkpoints all fail to load is an error naming each one and
why (it used to start again from step 1 with exit 0, overwriting and rotating them away);
--start-over moves them aside, never deletes them."""

from __future__ import annotations

from tests.training.helpers import losses, metrics, run_train

RUN = ("train.iterations=4", "checkpoint.interval=2", "checkpoint.keep=2")


def test_unloadable_checkpoints_stop_the_run_and_start_over_sets_them_aside(fi_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_train("bloom", fi_dataset, ckpt, *RUN)
    before = losses(ckpt)
    # a model changed on the command line: no checkpoint fits it
    proc = run_train("bloom", fi_dataset, ckpt, *RUN, "model.hidden_size=96", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr
    assert "holds checkpoints but none of them loads" in err and "--start-over" in err
    assert f"{ckpt / 'iter_0000004'}: failed to load" in err
    assert f"{ckpt / 'iter_0000002'}: failed to load" in err
    assert (ckpt / "latest").read_text() == "iter_0000004"
    assert losses(ckpt) == before  # metrics untouched
    # every manifest missing (half-written copies)
    for tag in ("iter_0000002", "iter_0000004"):
        (ckpt / tag / "manifest.json").unlink()
    proc = run_train("bloom", fi_dataset, ckpt, *RUN, check=False)
    assert proc.returncode == 2
    assert f"{ckpt / 'iter_0000004'}: {ckpt / 'iter_0000004' / 'manifest.json'} is missing" in (
        proc.stderr
    )
    # explicit start over: the old ones are kept aside with the reasons
    run_train("bloom", fi_dataset, ckpt, *RUN, "--start-over")
    (aside,) = ckpt.glob("set-aside-*")
    assert sorted(p.name for p in aside.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert "manifest.json is missing" in (aside / "WHY.txt").read_text()
    assert [r["step"] for r in metrics(aside)] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics(ckpt)] == [1, 2, 3, 4]  # the new run's own
    assert (ckpt / "latest").read_text() == "iter_0000004"
