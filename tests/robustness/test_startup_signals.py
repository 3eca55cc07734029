"""A stop signal during start-up (imports, engine build, checkpoint loading) stops the run at
its first step boundary with exit 0; it used to kill the rank with the signal's default action
(no message, no requeue)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from megatron_ext.training import stopping
from tests.training.helpers import env, train_cmd


def test_a_signal_recorded_early_is_taken_over():
    previous = {s: signal.getsignal(s) for s in stopping.STOP_SIGNALS}
    try:
        stopping.install_early_handlers()
        os.kill(os.getpid(), signal.SIGUSR1)
        stop = stopping.StopConditions()
        stop.install()
        assert stop.local_reason() == "signal SIGUSR1"
        stop.uninstall()
    finally:
        stopping._early_signal = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signal.SIGTERM - 1) & 1)


def _torch_loaded(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "libtorch" in f.read()


def test_sigterm_during_startup_exits_zero_without_training(fi_dataset, tmp_path):
    proc = subprocess.Popen(
        train_cmd("bloom", fi_dataset, tmp_path / "ckpt", "train.iterations=5"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.01)
    # the handler is there before torch is even imported (it used to come after the engine
    # build and checkpoint loading), so the signal lands in start-up, however loaded the machine
    assert not _torch_loaded(proc.pid)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step 0: signal SIGTERM (no step was run, nothing to save)" in out
    assert not (tmp_path / "ckpt" / "latest").exists()


def test_ctrl_c_to_the_launcher_stops_the_ranks_after_the_step_and_saves(fi_dataset, tmp_path):
    """SIGINT to `train --nproc-per-node` was not forwarded: the launcher waited for the ranks
    to finish (616 s in the probe). Now the ranks stop at the step boundary and save."""
    from tests.training.helpers import logged_steps

    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        train_cmd(
            "bloom", fi_dataset, ckpt, "parallel.tp=2", "train.iterations=50",
            "checkpoint.interval=100", nproc=2,
        ),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env({"hold_step": 2}),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while 2 not in logged_steps(ckpt) and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)  # the launcher only, as `kill -INT`
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step 2: signal SIGINT (checkpoint saved)" in out
    assert (ckpt / "latest").read_text() == "iter_0000002"
