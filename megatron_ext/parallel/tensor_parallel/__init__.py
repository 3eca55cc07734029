"""Megatron-style tensor parallelism over explicit process groups (CPU/gloo and GPU/NCCL)."""

from megatron_ext.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.parallel.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    gather_vocab_parallel_logits,
    normal_init,
    row_parallel_linear,
    scaled_normal_init,
)
from megatron_ext.parallel.tensor_parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)
from megatron_ext.parallel.tensor_parallel.random import RNGStatesTracker

__all__ = [
    "ColumnParallelLinear",
    "RNGStatesTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "column_parallel_linear",
    "copy_to_tp_region",
    "gather_from_sequence_parallel_region",
    "gather_from_tp_region",
    "gather_vocab_parallel_logits",
    "normal_init",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_parallel_region",
    "row_parallel_linear",
    "scaled_normal_init",
    "scatter_to_sequence_parallel_region",
    "scatter_to_tp_region",
    "vocab_parallel_cross_entropy",
]
