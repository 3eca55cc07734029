"""The same run under torchrun, the `deepspeed` launcher and Open MPI's mpirun gives the same
losses as under our own `--nproc-per-node` launcher (2 ranks, tp=2)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_ext.training.ranks import free_port
from tests.training.helpers import env, logged_steps, losses, run_train, train_cmd

pytestmark = pytest.mark.distributed

OVERRIDES = ("parallel.tp=2", "train.iterations=6", "checkpoint.interval=3")


@pytest.fixture(scope="module")
def local_losses(fi_dataset, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("launchers") / "local"
    run_train("bloom", fi_dataset, ckpt, *OVERRIDES, nproc=2)
    return losses(ckpt)


def _run_and_compare(cmd: list[str], ckpt, local: dict, extra_env: dict | None = None):
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**env(), **(extra_env or {})}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert (ckpt / "latest").read_text() == "iter_0000006"
    got = losses(ckpt)
    assert sorted(got) == list(range(1, 7))
    for step in local:
        assert abs(local[step] - got[step]) <= 1e-6, (step, local[step], got[step])
    return proc


def _module_args(fi_dataset, ckpt) -> list[str]:
    """`train_cmd` without its leading `python -m megatron_ext` (the launcher adds it)."""
    cmd = train_cmd("bloom", fi_dataset, ckpt, *OVERRIDES)
    assert cmd[:3] == [sys.executable, "-m", "megatron_ext"]
    return cmd[3:]


def test_torchrun_launch_equals_local_launcher(fi_dataset, tmp_path, local_losses):
    ckpt = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "-m", "megatron_ext"]
    _run_and_compare(cmd + _module_args(fi_dataset, ckpt), ckpt, local_losses)


def test_deepspeed_launcher_equals_local_launcher(fi_dataset, tmp_path, local_losses):
    """`deepspeed --num_gpus 2` on a CPU-only host: DeepSpeed picks its CPU accelerator itself,
    `--num_gpus` sets the number of local ranks, and each rank gets `--local_rank=N` before our
    command (`python -m megatron_ext --local_rank=N train ...`), which the CLI drops."""
    ckpt = tmp_path / "deepspeed"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    cmd += ["--master_port", str(free_port()), "--module", "megatron_ext"]
    proc = _run_and_compare(cmd + _module_args(fi_dataset, ckpt), ckpt, local_losses)
    assert "--local_rank=1" in proc.stdout + proc.stderr  # the launcher did pass it


def test_mpirun_launch_equals_local_launcher(fi_dataset, tmp_path, local_losses):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
    mpi_env = {
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "self,tcp",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }
    ckpt = tmp_path / "mpi"
    cmd = [mpirun, "-np", "2", *train_cmd("bloom", fi_dataset, ckpt, *OVERRIDES)]
    _run_and_compare(cmd, ckpt, local_losses, mpi_env)


def _rank_pid(launcher: psutil.Process, rank: int) -> int | None:
    for child in launcher.children(recursive=True):
        try:
            environ = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if environ.get("RANK") == str(rank) and "megatron_ext" in " ".join(child.cmdline()):
            return child.pid
    return None


def test_torchrun_rank_stopped_by_sigstop_times_out_naming_the_stage(fi_dataset, tmp_path):
    """A rank frozen by SIGSTOP (a node that stops answering) under torchrun's agent: the other
    rank's next collective times out with an error naming its stage, the job ends instead of
    hanging, and the last complete checkpoint stays `latest`."""
    ckpt = tmp_path / "sigstop"
    args = _module_args(fi_dataset, ckpt)
    # a save every step: the freeze lands in a train_batch or in a checkpoint save; both are named
    args += ["train.iterations=200", "checkpoint.interval=1", "train.collective_timeout_s=10"]
    args += ["checkpoint.save_timeout_s=10"]  # a freeze inside a save: saves have their own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), "-m", "megatron_ext", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    launcher = psutil.Process(proc.pid)
    frozen = None
    try:
        deadline = time.monotonic() + 180
        while not (ckpt / "latest").exists() or len(logged_steps(ckpt)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        frozen = _rank_pid(launcher, 1)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)
        frozen_at = max(logged_steps(ckpt))
        out, err = proc.communicate(timeout=180)
    finally:
        if frozen is not None and psutil.pid_exists(frozen):
            os.kill(frozen, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, err[-3000:]
    assert "rank 0 (pipeline stage 0/1, tp 0, dp 0) failed in a collective" in err, err[-12000:]
    assert "Timed out" in err, err[-3000:]
    assert max(logged_steps(ckpt)) <= frozen_at + 1  # nothing ran past the freeze
    latest = (ckpt / "latest").read_text()
    assert (ckpt / latest).is_dir() and int(latest.removeprefix("iter_")) <= frozen_at + 1
    assert not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == "zombie"
