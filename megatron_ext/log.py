"""Rank-aware logging: rank 0 logs at INFO, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys

_CONFIGURED = False


def global_rank() -> int:
    """This process's rank from the launcher's environment (torchrun, Slurm, Open MPI, PMIx)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.isdigit():
            return int(value)
    return 0


def get_logger(name: str) -> logging.Logger:
    """A logger under the `megatron_ext` hierarchy, configured once per process."""
    global _CONFIGURED
    if not _CONFIGURED:
        root = logging.getLogger("megatron_ext")
        handler = logging.StreamHandler(sys.stderr)
        rank = global_rank()
        prefix = f"[rank {rank}] " if rank else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
        )
        root.addHandler(handler)
        root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("megatron_ext") else f"megatron_ext.{name}")
