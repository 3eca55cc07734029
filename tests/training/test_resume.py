"""Fault tolerance: SIGKILL + restart is bit-exact, signals, exit duration and kill switch save
and exit 0, non-finite losses are skipped (K in a row abort), broken checkpoints are never
loaded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.training.helpers import env, losses, metrics, run_train, train_cmd


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


def _wait_for_a_step(ckpt: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the first metrics row is written (metrics.jsonl exists, empty, before step 1)."""
    path = ckpt / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, f"{path} got no row"
        time.sleep(0.01)


def test_sigkill_and_resume_is_bit_exact(fi_dataset, tmp_path):
    args = ("train.iterations=30", "checkpoint.interval=5", "checkpoint.keep=10")
    run_train("bloom", fi_dataset, tmp_path / "ref", *args)
    ref = losses(tmp_path / "ref")

    ckpt = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd("bloom", fi_dataset, ckpt, *args),
        env=env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_for(ckpt / "iter_0000005" / "manifest.json", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed_at = (ckpt / "latest").read_text().strip()
    assert killed_at != "iter_0000030", "the run finished before the kill; nothing tested"

    resumed = run_train("bloom", fi_dataset, ckpt, *args)
    assert f"loaded checkpoint {ckpt / killed_at}" in resumed.stderr
    got = losses(ckpt)
    assert sorted(got) == list(range(1, 31))
    assert got == ref  # bit for bit (JSON keeps every digit of the float)


def test_sigusr1_saves_and_exits_zero(fi_dataset, tmp_path):
    ckpt = tmp_path / "sig"
    cmd = train_cmd(
        "bloom",
        fi_dataset,
        ckpt,
        "parallel.pp=2",
        "train.iterations=100000",
        "checkpoint.interval=100000",
        "optim.decay_style=constant",
        nproc=2,
    )
    proc = subprocess.Popen(
        cmd, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for_a_step(ckpt, proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)  # to the launcher, which forwards it to both ranks
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert "stopping at step" in err and "signal SIGUSR1" in err
    last = metrics(ckpt)[-1]["step"]
    assert (ckpt / "latest").read_text().strip() == f"iter_{last:07d}"
    assert (ckpt / f"iter_{last:07d}" / "config.yaml").is_file()


def test_kill_switch_file_saves_and_exits_zero(fi_dataset, tmp_path):
    ckpt, switch = tmp_path / "ks", tmp_path / "STOP"
    cmd = train_cmd(
        "bloom",
        fi_dataset,
        ckpt,
        "train.iterations=100000",
        "checkpoint.interval=100000",
        f"train.kill_switch_file={switch}",
    )
    proc = subprocess.Popen(
        cmd, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for_a_step(ckpt, proc)
    switch.write_text("")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    assert "kill-switch file" in err
    last = metrics(ckpt)[-1]["step"]
    assert (ckpt / "latest").read_text().strip() == f"iter_{last:07d}"


def test_exit_duration_saves_and_exits_zero_on_all_ranks(fi_dataset, tmp_path):
    """--exit-duration-in-mins through our launcher at tp=2: both ranks agree on the stop."""
    ckpt = tmp_path / "dur"
    args = ["parallel.tp=2", "train.iterations=100000", "checkpoint.interval=100000"]
    proc = run_train("bloom", fi_dataset, ckpt, *args, "--exit-duration-in-mins", "0.4", nproc=2)
    assert "exit duration of 0.4 min reached" in proc.stderr, proc.stderr[-3000:]
    last = metrics(ckpt)[-1]["step"]
    assert 1 <= last < 100000
    assert (ckpt / "latest").read_text().strip() == f"iter_{last:07d}"
    assert (ckpt / f"iter_{last:07d}" / "config.yaml").is_file()
    # the budget counts from process start: 0.6 s is gone before the first step
    early = tmp_path / "early"
    proc = run_train("bloom", fi_dataset, early, *args[1:], "--exit-duration-in-mins", "0.01")
    assert "stopping at step 0: exit duration of 0.01 min reached (no step was run" in proc.stderr
    assert not (early / "latest").exists()


def test_nonfinite_loss_is_skipped_then_aborts(fi_dataset, tmp_path):
    ckpt = tmp_path / "nan"
    run_train(
        "bloom",
        fi_dataset,
        ckpt,
        "train.iterations=6",
        "checkpoint.interval=100",
        faults={"nonfinite_steps": [3]},
    )
    rows = {r["step"]: r for r in metrics(ckpt)}
    assert rows[3]["skipped"] and rows[3]["loss"] is None
    assert all(rows[s]["loss"] is not None for s in (1, 2, 4, 5, 6))  # weights stayed finite

    ckpt = tmp_path / "abort"
    proc = run_train(
        "bloom",
        fi_dataset,
        ckpt,
        "train.iterations=10",
        "checkpoint.interval=2",
        "train.max_nonfinite_steps=3",
        check=False,
        faults={"nonfinite_steps": [3, 4, 5]},
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 non-finite losses in a row" in proc.stderr
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"  # the last good one kept


def test_broken_checkpoint_falls_back(fi_dataset, tmp_path):
    args = ("train.iterations=6", "checkpoint.interval=2", "checkpoint.keep=3")
    ref_dir = tmp_path / "ref"
    run_train("bloom", fi_dataset, ref_dir, *args)
    ref = losses(ref_dir)
    for damage in ("truncate", "no_manifest", "garbage"):
        ckpt = tmp_path / damage
        shutil.copytree(ref_dir, ckpt)
        newest = ckpt / "iter_0000006"
        layer = newest / "layer_01-model_00-model_states.pt"
        if damage == "truncate":
            layer.write_bytes(layer.read_bytes()[:100])
        elif damage == "no_manifest":  # killed before the manifest was written
            (newest / "manifest.json").unlink()
        else:  # same size, garbage content: the manifest passes, the load fails
            layer.write_bytes(b"\0" * layer.stat().st_size)
        (ckpt / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in metrics(ckpt) if r["step"] <= 4)
        )
        proc = run_train("bloom", fi_dataset, ckpt, *args)
        assert "iter_0000006" in proc.stderr and "WARNING" in proc.stderr, damage
        assert f"loaded checkpoint {ckpt / 'iter_0000004'}" in proc.stderr, damage
        assert losses(ckpt) == ref, damage


def test_dead_rank_gives_an_error_naming_the_stage(fi_dataset, tmp_path):
    import psutil

    ckpt = tmp_path / "dead"
    cmd = train_cmd(
        "bloom",
        fi_dataset,
        ckpt,
        "parallel.pp=2",
        "train.iterations=100000",
        "checkpoint.interval=100000",
        "train.collective_timeout_s=30",
        nproc=2,
    )
    proc = subprocess.Popen(
        cmd, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for_a_step(ckpt, proc)
    ranks = sorted(psutil.Process(proc.pid).children(), key=lambda p: p.environ()["RANK"])
    ranks[1].kill()  # the last pipeline stage dies mid-run
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 0 (pipeline stage 0/2, tp 0, dp 0) failed in a collective" in err, err[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "layout,collective",
    [
        # TP all-reduce in a group made after init_process_group: regression test for the
        # 30-minute default timeout of subgroups (engine.apply_collective_timeout)
        ("parallel.tp=2", "forward_pass"),
        # stage 0 waits for the last stage's gradients
        ("parallel.pp=2", "recv_grads"),
    ],
)
def test_stuck_rank_times_out_naming_stage_and_collective(layout, collective, fi_dataset, tmp_path):
    """Rank 1 is alive but stuck (sleeps forever in its forward of step 3): rank 0's collective
    times out after train.collective_timeout_s with an error naming its stage and the
    collective, exits 4, and the launcher stops the stuck rank. Without the timeout this run
    would hang (the subprocess timeout fails the test)."""
    ckpt = tmp_path / "stuck"
    cmd = train_cmd(
        "bloom",
        fi_dataset,
        ckpt,
        layout,
        "train.iterations=6",
        "checkpoint.interval=2",
        "train.collective_timeout_s=10",
        nproc=2,
    )
    faults = {"hang_step": 3, "hang_rank": 1}
    proc = subprocess.run(cmd, env=env(faults), text=True, capture_output=True, timeout=240)
    err = proc.stderr
    assert proc.returncode == 4, err[-3000:]
    assert "fault injection: rank 1 hangs here" in err
    stage = "pipeline stage 0/2, tp 0" if "pp=2" in layout else "pipeline stage 0/1, tp 0"
    assert f"step 3: rank 0 ({stage}, dp 0) failed in a collective" in err, err[-3000:]
    assert f"pipeline instruction {collective}" in err, err[-3000:]
    assert "Timed out" in err, err[-3000:]
    assert "stopping the other ranks" in err
    assert (ckpt / "latest").read_text() == "iter_0000002"  # the last complete checkpoint
