"""The same run under Open MPI's mpirun (ranks from OMPI_COMM_WORLD_*) and under our own
`--nproc-per-node` launcher gives the same losses."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.training.helpers import env, losses, run_train, train_cmd

pytestmark = pytest.mark.distributed


def test_mpirun_launch_equals_local_launcher(fi_dataset, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("Open MPI's mpirun is not installed (apt-get install openmpi-bin)")
    overrides = ("parallel.tp=2", "train.iterations=6", "checkpoint.interval=3")
    run_train("bloom", fi_dataset, tmp_path / "local", *overrides, nproc=2)
    mpi_env = {
        **env(),
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "self,tcp",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
    }
    cmd = [mpirun, "-np", "2", *train_cmd("bloom", fi_dataset, tmp_path / "mpi", *overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mpi_env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "mpi" / "latest").read_text() == "iter_0000006"
    local, mpi = losses(tmp_path / "local"), losses(tmp_path / "mpi")
    assert sorted(mpi) == list(range(1, 7))
    for step in local:
        assert abs(local[step] - mpi[step]) <= 1e-6, (step, local[step], mpi[step])
