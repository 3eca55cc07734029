"""Column-/row-parallel linear layers and the vocabulary-parallel embedding.

Shapes: x [..., in] -> y [..., out]; under sequence parallelism the leading dimension is the
sequence, split over the TP group ([s/tp, b, h] outside the TP region, [s, b, h] inside).

Initialisation is independent of the TP size: each weight is initialised in full (fp32, on the
CPU, from the default generator) and each rank keeps its slice, as megatron-core does with
`use_cpu_initialization=True`. Built under `torch.device("meta")` nothing is allocated.

Parameter tags read by the TP-duplicate checks and the conversion code:
`param.tensor_parallel = True` and `param.partition_dim` for split weights,
`param.tp_duplicated = True` for parameters every TP rank holds in full (row biases).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.parallel.tensor_parallel.mappings import (
    Group,
    copy_to_tp_region,
    gather_from_sequence_parallel_region,
    gather_from_tp_region,
    group_rank,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tp_region,
)

InitMethod = Callable[[torch.Tensor], object]  # fills the full (unsplit) tensor in place
# (tp_rank, tp_size) -> the indices along the split dimension this rank holds.
Partition = Callable[[int, int], torch.Tensor | slice]


def normal_init(std: float) -> InitMethod:
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """std / sqrt(2 * num_layers): Megatron's init for the projections into the residual."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def contiguous_partition(total: int) -> Partition:
    def rows(tp_rank: int, tp_size: int) -> slice:
        if total % tp_size:
            raise ValueError(f"dimension {total} is not divisible by the TP size {tp_size}")
        n = total // tp_size
        return slice(tp_rank * n, (tp_rank + 1) * n)

    return rows


def _take(full: torch.Tensor, index: torch.Tensor | slice, dim: int) -> torch.Tensor:
    if isinstance(index, slice):
        return full.narrow(dim, index.start, index.stop - index.start)
    return full.index_select(dim, index.to(full.device))


def make_param(
    full_shape: tuple[int, ...],
    init_method: InitMethod,
    shard: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Parameter:
    """Initialise the full tensor (fp32, CPU), keep `shard(full)` as this rank's parameter."""
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.empty(0).device
    if device.type == "meta":
        return nn.Parameter(shard(torch.empty(full_shape, device="meta")).to(dtype))
    full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
    init_method(full)
    return nn.Parameter(shard(full).to(device=device, dtype=dtype).contiguous().clone())


def column_parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: Group,
    sequence_parallel: bool = False,
    gather_output: bool = False,
) -> torch.Tensor:
    """x [..., in] (or [s/tp, b, in] with SP) -> y [..., out/tp].

    Forward: identity (SP: all-gather of the sequence); backward: all-reduce of dx (SP:
    reduce-scatter). gather_output all-gathers y over the last dimension.
    """
    x = (
        gather_from_sequence_parallel_region(x, group)
        if sequence_parallel
        else copy_to_tp_region(x, group)
    )
    y = F.linear(x, weight, bias)
    return gather_from_tp_region(y, group) if gather_output else y


def row_parallel_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: Group,
    sequence_parallel: bool = False,
    input_is_parallel: bool = True,
) -> torch.Tensor:
    """x [..., in/tp] -> y [..., out] (SP: [s/tp, b, out]); the bias is added after the reduce.

    Forward: all-reduce of the partial products (SP: reduce-scatter along the sequence);
    backward: identity (SP: all-gather).
    """
    if not input_is_parallel:
        x = scatter_to_tp_region(x, group)
    y = F.linear(x, weight)
    if sequence_parallel:
        y = reduce_scatter_to_sequence_parallel_region(y, group)
    else:
        y = reduce_from_tp_region(y, group)
    return y if bias is None else y + bias


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along out (rows) over the TP group.

    `partition(tp_rank, tp_size)` picks this rank's rows of the full weight (default: the
    rank's contiguous chunk; attention and SwiGLU pass interleaved layouts). `weight_fn`
    wraps weight and bias before use (replicated KV heads sum their gradients through it).
    With skip_bias_add the bias is left for the caller to fuse (e.g. `bias_gelu`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: Group,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        skip_bias_add: bool = False,
        init_method: InitMethod | None = None,
        partition: Partition | None = None,
        weight_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.skip_bias_add, self.weight_fn = skip_bias_add, weight_fn
        partition = partition or contiguous_partition(out_features)
        rows = partition(group_rank(tp_group), group_size(tp_group))
        init = init_method or normal_init(0.02)
        kw = {"device": device, "dtype": dtype}
        self.weight = make_param(
            (out_features, in_features), init, lambda t: _take(t, rows, 0), **kw
        )
        self.weight.tensor_parallel, self.weight.partition_dim = True, 0
        self.bias = None
        if bias:
            self.bias = make_param(
                (out_features,), nn.init.zeros_, lambda t: _take(t, rows, 0), **kw
            )
            self.bias.tensor_parallel, self.bias.partition_dim = True, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, None if self.skip_bias_add else self.bias
        if self.weight_fn is not None:
            weight = self.weight_fn(weight)
            bias = self.weight_fn(bias) if bias is not None else None
        return column_parallel_linear(
            x, weight, bias, self.tp_group, self.sequence_parallel, self.gather_output
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, local_out={self.weight.shape[0]}"


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W [out, in] split along in (columns); b is TP-duplicated."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        tp_group: Group,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        cols = contiguous_partition(in_features)(group_rank(tp_group), group_size(tp_group))
        init = init_method or normal_init(0.02)
        kw = {"device": device, "dtype": dtype}
        self.weight = make_param(
            (out_features, in_features), init, lambda t: _take(t, cols, 1), **kw
        )
        self.weight.tensor_parallel, self.weight.partition_dim = True, 1
        self.bias = None
        if bias:
            self.bias = make_param((out_features,), nn.init.zeros_, **kw)
            self.bias.tp_duplicated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_parallel_linear(
            x, self.weight, self.bias, self.tp_group, self.sequence_parallel, self.input_is_parallel
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, local_in={self.weight.shape[1]}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table [V_padded, h] split along the vocabulary over the TP group.

    ids [...] (int64) -> [..., h]. Each rank looks up the ids in its range, zeros the rest,
    then the partial results are all-reduced (SP: reduce-scattered along dimension 0, so pass
    ids as [s, b]). Rows from `num_real_embeddings` on are vocabulary padding: initialised to
    zero and never looked up.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        tp_group: Group,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        num_real_embeddings: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_group, self.sequence_parallel = tp_group, sequence_parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        tp_rank, tp_size = group_rank(tp_group), group_size(tp_group)
        rows = contiguous_partition(num_embeddings)(tp_rank, tp_size)
        self.vocab_start, self.vocab_end = rows.start, rows.stop
        real = num_real_embeddings or num_embeddings
        init = init_method or normal_init(0.02)

        def init_real_rows(full: torch.Tensor) -> None:
            full.zero_()  # padding rows stay zero
            init(full[:real])

        kw = {"device": device, "dtype": dtype}
        shape = (num_embeddings, embedding_dim)
        self.weight = make_param(shape, init_real_rows, lambda t: _take(t, rows, 0), **kw)
        self.weight.tensor_parallel, self.weight.partition_dim = True, 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        return reduce_from_tp_region(out, self.tp_group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local_rows={self.weight.shape[0]}"


def gather_vocab_parallel_logits(
    logits: torch.Tensor, group: Group, vocab_size: int | None = None
) -> torch.Tensor:
    """[..., V_padded/tp] -> [..., vocab_size]: all-gather over `group`, padding columns dropped.

    Differentiable (backward keeps this rank's slice); for evaluation and tests.
    """
    full = gather_from_tp_region(logits, group)
    return full if vocab_size is None else full[..., :vocab_size]
