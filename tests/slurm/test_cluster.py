"""slurm/local/cluster.sh: up (idempotent), status, a job step on every node, down by PID.

Each case brings up its own cluster (own state dir and ports) beside the session's, so the
1-node and 2-node shapes are both exercised without disturbing the other tests.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.slurm.helpers import CLUSTER

pytestmark = pytest.mark.slurm


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


@pytest.mark.parametrize("nodes", [1, 2])
def test_up_status_job_down(tmp_path, nodes):
    state = tmp_path / "slurm"
    env = dict(os.environ, MEGATRON_EXT_SLURM_DIR=str(state), MEGATRON_EXT_SLURM_PORT="17817")
    env["SLURM_CONF"] = str(state / "slurm.conf")

    def cluster(*args):
        return subprocess.run(["bash", str(CLUSTER), *args], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    try:
        up = cluster("up", "--nodes", str(nodes))
        assert up.returncode == 0, up.stderr
        assert "already up" in cluster("up", "--nodes", str(nodes)).stderr  # idempotent
        status = cluster("status")
        assert status.returncode == 0 and f"up: {nodes} node(s)" in status.stdout
        pids = [state / "munge" / "munged.pid", state / "slurmctld.pid"]
        pids += [state / f"slurmd-node{i}.pid" for i in range(1, nodes + 1)]
        assert all(_alive(p) for p in pids)

        step = subprocess.run(
            ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "bash", "-c",
             "echo $SLURM_PROCID $SLURMD_NODENAME"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert step.returncode == 0, step.stderr
        expected = {f"{i} node{i + 1}" for i in range(nodes)}
        assert set(step.stdout.split("\n")) - {""} == expected
        saved = [int(p.read_text()) for p in pids]
    finally:
        down = cluster("down")
    assert down.returncode == 0, down.stderr
    assert cluster("status").returncode == 1
    for pid in saved:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
