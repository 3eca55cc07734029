"""One run per checkpoint directory: a second `train` on a directory in use stops at once,
naming the run that holds it, and leaves that run's files alone; a dead run's lock is no lock."""

from __future__ import annotations

import subprocess
import time

from tests.training.helpers import env, logged_steps, losses, run_train, train_cmd


def test_a_second_run_on_the_same_directory_is_refused(fi_dataset, tmp_path):
    ckpt, stop_file = tmp_path / "ckpt", tmp_path / "stop"
    first = subprocess.Popen(
        train_cmd(
            "bloom", fi_dataset, ckpt, "train.iterations=6",
            "checkpoint.interval=100", f"train.kill_switch_file={stop_file}",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env({"hold_step": 2}),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while 2 not in logged_steps(ckpt) and time.monotonic() < deadline:
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.3)
        assert 2 in logged_steps(ckpt)
        second = run_train("bloom", fi_dataset, ckpt, "train.iterations=6", check=False)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "is in use by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr  # names the holder (host and pid)
        assert logged_steps(ckpt) == [1, 2]  # the second run wrote nothing
        stop_file.touch()
        assert first.wait(timeout=120) == 0
    finally:
        if first.poll() is None:
            first.kill()
    # the first run has ended (its lock died with it): the directory can be resumed
    run_train("bloom", fi_dataset, ckpt, "train.iterations=3", "checkpoint.interval=100")
    assert sorted(losses(ckpt)) == [1, 2, 3]
