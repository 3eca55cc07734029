"""Fixtures of the slurm tier: a real Slurm on 127.0.0.1 (slurm/local/cluster.sh, 2 fake nodes).

The cluster comes up once per session (about 1 s) and goes down at the end unless it was already
up. Every test runs under a hard timeout (SIGALRM; `helpers.hard_timeout(s)` to change it) and
every job it submits through the `jobs` fixture is scancel'ed at teardown, passed or not. Skipped
only when the Slurm binaries are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from tests.slurm.helpers import CLUSTER, DEFAULT_TIMEOUT_S, Jobs

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged")


def pytest_collection_modifyitems(config, items):
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    skip = pytest.mark.skip(
        reason=f"Slurm not installed ({', '.join(missing)} missing): "
        "apt-get install slurmctld slurmd slurm-client munge libpmix2"
    )
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)


def _cluster(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def local_cluster():
    """SLURM_CONF of a running 2-node local cluster."""
    was_up = _cluster("status").returncode == 0 and "2 node(s)" in _cluster("status").stdout
    proc = _cluster("up", "--nodes", "2")
    if proc.returncode != 0:
        pytest.fail(f"slurm/local/cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}")
    conf = _cluster("env").stdout.strip().split("=", 1)[1]
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if not was_up:
        _cluster("down")


@pytest.fixture
def jobs(local_cluster):
    tracker = Jobs()
    yield tracker
    tracker.cancel()


@pytest.fixture(autouse=True)
def _hard_timeout(request):
    seconds = getattr(request.function, "_hard_timeout_s", DEFAULT_TIMEOUT_S)

    def expire(signum, frame):
        raise TimeoutError(f"{request.node.name}: hard timeout of {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
