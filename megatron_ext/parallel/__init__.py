"""Parallelism: the ParallelContext (process groups) and our Megatron-style tensor parallelism.

The names below are imported on first use, so that torch-free parts (`rank_env`, which curate
uses to find its rank) do not pull in torch."""

import importlib

_EXPORTS = {
    "ParallelContext": "context",
    "coord_of": "context",
    "global_rank_of": "context",
    "group_ranks": "context",
    "allreduce_tp_duplicated_grads": "drift",
    "check_tp_drift": "drift",
    "register_tp_duplicated_grad_hooks": "drift",
    "resync_tp_duplicated": "drift",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
