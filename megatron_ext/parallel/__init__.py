"""Parallelism: the ParallelContext (process groups) and our Megatron-style tensor parallelism."""

from megatron_ext.parallel.context import ParallelContext, coord_of, global_rank_of, group_ranks
from megatron_ext.parallel.drift import (
    allreduce_tp_duplicated_grads,
    check_tp_drift,
    register_tp_duplicated_grad_hooks,
    resync_tp_duplicated,
)

__all__ = [
    "ParallelContext",
    "allreduce_tp_duplicated_grads",
    "check_tp_drift",
    "coord_of",
    "global_rank_of",
    "group_ranks",
    "register_tp_duplicated_grad_hooks",
    "resync_tp_duplicated",
]
