"""Rank, world and master address from torchrun, Open MPI/PMIx and Slurm variables."""

from __future__ import annotations

import pytest

from megatron_ext.parallel.rank_env import dist_env, expand_nodelist


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("node[1-2]", ["node1", "node2"]),
        ("nid[001234-001236,001240]", ["nid001234", "nid001235", "nid001236", "nid001240"]),
        ("a[1-2],login1", ["a1", "a2", "login1"]),
        ("r[1-2]n[8-9]", ["r1n8", "r1n9", "r2n8", "r2n9"]),
        ("gpu-[09-10]", ["gpu-09", "gpu-10"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "nid[005001-005002]",
    "SLURM_JOB_ID": "123456",
}


def test_slurm_only():
    env = dist_env(SLURM)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.node_rank == 1 and env.source == "slurm"
    assert env.master_addr == "nid005001"
    assert env.master_port == 20000 + 123456 % 20000  # the rendered script's rule


def test_exported_torch_variables_win():
    env = dist_env({**SLURM, "RANK": "2", "WORLD_SIZE": "8", "LOCAL_RANK": "2",
                    "MASTER_ADDR": "x", "MASTER_PORT": "999"})  # fmt: skip
    assert (env.rank, env.local_rank, env.master_addr, env.master_port) == (2, 2, "x", 999)
    assert env.source == "torchrun"


def test_mpi_rank_beats_slurm_procid_under_mpirun():
    # Under mpirun inside an allocation SLURM_PROCID is the node's number, not the MPI rank.
    env = dist_env({**SLURM, "SLURM_PROCID": "0", "OMPI_COMM_WORLD_RANK": "3",
                    "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "3"})  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 8, 3, "mpi")


def test_single_process():
    env = dist_env({})
    assert (env.rank, env.world_size, env.master_addr, env.source) == (0, 1, "127.0.0.1", "single")
    assert env.torch_env()["WORLD_SIZE"] == "1"


def test_tasks_per_node_with_repeat_count():
    env = dist_env({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS_PER_NODE"}
                   | {"SLURM_TASKS_PER_NODE": "4(x2)"})  # fmt: skip
    assert env.local_world_size == 4
