"""A one-step "trainer" whose step is an MPI all-reduce: checks `srun --mpi=pmix` launches.

    python tests/slurm/mpi_trainer.py --config RUN.yaml

Each rank records its MPI rank, the Slurm/torchrun-style variables the job script exported and
the all-reduce result in `<checkpoint.dir>/mpi_ranks.jsonl`; rank 0 then writes `latest` for
`train.iterations` like a finished run, so the job script sees the target reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megatron_ext.launch.run_config import get, load_run_config  # noqa: E402
from megatron_ext.parallel.rank_env import dist_env  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    args = ap.parse_args()
    cfg = load_run_config(args.config)
    ckpt = Path(get(cfg, "checkpoint.dir"))
    iterations = int(get(cfg, "train.iterations"))
    ckpt.mkdir(parents=True, exist_ok=True)

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    total = comm.allreduce(comm.Get_rank() + 1, op=MPI.SUM)
    env = dist_env()
    rec = {
        "mpi_rank": comm.Get_rank(),
        "mpi_size": comm.Get_size(),
        "allreduce": total,
        "env_rank": env.rank,
        "env_source": env.source,
        "slurm_procid": os.environ.get("SLURM_PROCID"),
        "node": os.environ.get("SLURMD_NODENAME"),
    }
    for r in range(comm.Get_size()):  # one writer at a time
        if r == comm.Get_rank():
            with open(ckpt / "mpi_ranks.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        comm.Barrier()
    if comm.Get_rank() == 0:
        (ckpt / "latest").write_text(f"iter_{iterations:07d}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
