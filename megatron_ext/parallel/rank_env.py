"""Where this process sits in a job: rank, world size, master address, from the launcher's env.

Dependency-free on purpose (standard library only): the trainer imports it before torch is set up,
and job scripts can call `python -m megatron_ext.parallel.rank_env` to print the values.

Sources, first match wins:
- torchrun-style variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), as
  exported by our rendered sbatch scripts and by torchrun;
- Open MPI / PMIx (`OMPI_COMM_WORLD_RANK`, `PMIX_RANK`) for `srun --mpi=pmix` and `mpirun`; under
  `mpirun` inside an allocation `SLURM_PROCID` is the node's number, not the rank, so MPI comes
  before Slurm;
- Slurm (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`, `SLURM_JOB_NODELIST`): the master is
  the first host of the node list;
- nothing: a single process on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "mpi", "slurm" or "single"

    def torch_env(self) -> dict[str, str]:
        """The variables `torch.distributed.init_process_group(init_method="env://")` reads."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list like `scontrol show hostnames` does.

    `nid[001234-001236,001240],login1` -> `nid001234, nid001235, nid001236, nid001240, login1`;
    zero padding is kept; several bracket groups in one name (`r[1-2]n[1-2]`) expand as a product.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out = []
    for rng in m.group(1).split(","):
        lo, _, hi = rng.partition("-")
        width = len(lo)
        for n in range(int(lo), int(hi or lo) + 1):
            out.extend(head + str(n).zfill(width) + rest for rest in _expand_one(tail))
    return out


def _int(env: Mapping[str, str], *keys: str) -> int | None:
    for key in keys:
        value = env.get(key, "")
        # SLURM_TASKS_PER_NODE-style values ("2(x3)") start with the number we want.
        m = re.match(r"\d+", value)
        if m:
            return int(m.group())
    return None


def _master(env: Mapping[str, str]) -> tuple[str, int]:
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    port = _int(env, "MASTER_PORT")
    if port is None:
        # One port per job, so jobs sharing a node (or the local test cluster) do not collide.
        job_id = _int(env, "SLURM_JOB_ID")
        port = 20000 + job_id % 20000 if job_id is not None else DEFAULT_PORT
    return addr, port


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Rank, world size and rendezvous address of this process (see the module docstring)."""
    env = os.environ if environ is None else environ
    addr, port = _master(env)
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", "SLURM_LOCALID")
        local_world = _int(env, "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE")
    elif "OMPI_COMM_WORLD_RANK" in env or "PMIX_RANK" in env:
        source = "mpi"
        rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "PMIX_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        source = "slurm"
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID")
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    else:
        return DistEnv(0, 1, 0, 1, 0, addr, port, "single")
    rank, world = rank or 0, world or 1
    local_rank = local_rank if local_rank is not None else 0
    local_world = local_world or 1
    node_rank = _int(env, "NODE_RANK", "GROUP_RANK", "SLURM_NODEID")
    if node_rank is None:
        node_rank = rank // local_world
    return DistEnv(rank, world, local_rank, local_world, node_rank, addr, port, source)


def main() -> int:
    for key, value in dist_env().torch_env().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
