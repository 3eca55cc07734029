"""Column-/row-parallel linear layers and the vocabulary-parallel embedding.

Shapes: x [..., in] -> y [..., out]; under sequence parallelism the leading dimension is the
sequence, split over the TP group ([s/tp, b, h] outside the TP region, [s, b, h] inside).

Initialisation is independent of the TP size, and each rank generates only its own shard
(issue 17.6): a normal init (`TiledNormal`) fills the full tensor's 2-D view [rows, cols] in
fixed tiles of TILE = (64, 1024) elements, each drawn from its own generator seeded by the
parameter's seed (one draw from the default generator, so the stage seeds of stage_init_rng
still decide everything) and the tile's coordinates; a rank generates the tiles that hold its
rows (column-parallel, vocabulary) or columns (row-parallel) and nothing else. Values are the
same as initialising the full tensor and slicing it (test_layers.py) at any tp and pp; peak
memory is the shard plus one tile instead of the full fp32 tensor, and the work 1/tp of it.
Other inits (zeros, ones) are made at the shard's size directly. Built under
`torch.device("meta")` nothing is allocated.

Parameter tags read by the TP-duplicate checks and the conversion code:
`param.tensor_parallel = True` and `param.partition_dim` for split weights,
`param.tp_duplicated = True` for parameters every TP rank holds in full (row biases).
"""

from __future__ import annotations

import math
import os
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


TILE = (64, 1024)
# MEGATRON_EXT_FULL_INIT=1: initialise every full tensor and slice it (the same values, the
# cost before issue 17.6; benchmarks/startup.py compares the two)
FULL_INIT = os.environ.get("MEGATRON_EXT_FULL_INIT") == "1"
_MASK64 = (1 << 64) - 1


def _mix(*words: int) -> int:
    """splitmix64 over WORDS: a 63-bit seed that differs for each tile of each parameter."""
    x = 0
    for w in words:
        x = (x ^ (w & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
        x ^= x >> 31
    return x >> 1


class TiledNormal:
    """Normal(0, std) init drawn tile by tile (see the module docstring); rows from `real_rows`
    on (vocabulary padding) are zero. Call it on a full tensor, or `shard` for one rank's part.
    The parameter's seed is drawn from the default generator when the parameter is made."""

    def __init__(self, std: float, real_rows: int | None = None):
        self.std, self.real_rows = std, real_rows

    def with_real_rows(self, real_rows: int) -> TiledNormal:
        rows = real_rows if self.real_rows is None else min(real_rows, self.real_rows)
        return TiledNormal(self.std, rows)

    def _tile(self, seed: int, ti: int, tj: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(_mix(seed, ti, tj))
        return torch.empty(TILE, dtype=torch.float32).normal_(0.0, self.std, generator=g)

    def shard(self, full_shape, index: torch.Tensor | slice | None, dim: int, seed: int):
        """The part `_take(full, index, dim)` of the full tensor, generating only its tiles."""
        rows = full_shape[0] if full_shape else 1
        cols = math.prod(full_shape[1:]) if len(full_shape) > 1 else 1
        row_ids = torch.arange(rows)
        col_ids = torch.arange(cols)
        if index is not None:
            taken = row_ids if dim == 0 else col_ids
            taken = taken[index] if isinstance(index, slice) else taken[index.to(torch.long)]
            row_ids, col_ids = (taken, col_ids) if dim == 0 else (row_ids, taken)
        out = torch.zeros(len(row_ids), len(col_ids), dtype=torch.float32)
        tr, tc = TILE
        real = rows if self.real_rows is None else self.real_rows
        col_groups = _by_tile(col_ids, tc)
        for ti, in_rows in _by_tile(row_ids, tr):
            if ti * tr >= real:
                continue  # padding rows only: zero
            local_r = row_ids[in_rows] - ti * tr
            for tj, in_cols in col_groups:
                block = self._tile(seed, ti, tj)[local_r][:, col_ids[in_cols] - tj * tc]
                out[in_rows.unsqueeze(1), in_cols.unsqueeze(0)] = block
        if real < rows:
            out[row_ids >= real] = 0.0
        if not full_shape:
            return out.reshape(())
        shape = list(full_shape)
        if index is not None and dim == 0:
            shape[0] = len(row_ids)
        elif index is not None:
            if len(full_shape) != 2 or dim != 1:
                raise ValueError(f"a tiled shard along dim {dim} of shape {full_shape}")
            shape[1] = len(col_ids)
        return out.reshape(shape)

    def __call__(self, full: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        seed = _draw_seed() if seed is None else seed
        with torch.no_grad():
            return full.copy_(self.shard(tuple(full.shape), None, 0, seed))


def _by_tile(ids: torch.Tensor, size: int) -> list[tuple[int, torch.Tensor]]:
    """(tile number, positions in IDS of the ids in that tile) for each tile IDS touch."""
    tiles = ids // size
    order = torch.argsort(tiles, stable=True)
    numbers, counts = torch.unique_consecutive(tiles[order], return_counts=True)
    return list(zip(numbers.tolist(), torch.split(order, counts.tolist()), strict=True))


def _draw_seed() -> int:
    return int(torch.randint(0, 2**62, (1,)).item())


def normal_init(std: float) -> InitMethod:
    return TiledNormal(std)


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
    index: torch.Tensor | slice | None = None,
    dim: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Parameter:
    """This rank's part `_take(full, index, dim)` of a parameter of FULL_SHAPE (the whole
    parameter when INDEX is None), initialised as if the full tensor were (fp32, CPU): a
    `TiledNormal` generates only the part, zeros/ones are made at its size, any other init
    fills the full tensor first."""
    dtype = dtype or torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.empty(0).device

    def shard(t: torch.Tensor) -> torch.Tensor:
        return t if index is None else _take(t, index, dim)

    if device.type == "meta":
        return nn.Parameter(shard(torch.empty(full_shape, device="meta")).to(dtype))
    if isinstance(init_method, TiledNormal) and not FULL_INIT:
        part = init_method.shard(full_shape, index, dim, _draw_seed())
    elif init_method in (nn.init.zeros_, nn.init.ones_):
        part_shape = shard(torch.empty(full_shape, device="meta")).shape
        part = init_method(torch.empty(part_shape, dtype=torch.float32))
    else:
        full = torch.empty(full_shape, dtype=torch.float32, device="cpu")
        init_method(full)
        # a view of the full tensor: copied out, so that the full tensor can be freed
        return nn.Parameter(shard(full).to(device=device, dtype=dtype).contiguous().clone())
    # a tensor of its own already: no second copy (at 176B one shard is gigabytes)
    return nn.Parameter(part.to(device=device, dtype=dtype))


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
        self.weight = make_param((out_features, in_features), init, rows, 0, **kw)
        self.weight.tensor_parallel, self.weight.partition_dim = True, 0
        self.bias = None
        if bias:
            self.bias = make_param((out_features,), nn.init.zeros_, rows, 0, **kw)
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
        self.weight = make_param((out_features, in_features), init, cols, 1, **kw)
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
        if isinstance(init, TiledNormal):
            init_real_rows = init.with_real_rows(real)  # padding rows stay zero
        else:

            def init_real_rows(full: torch.Tensor) -> None:
                full.zero_()  # padding rows stay zero
                init(full[:real])

        kw = {"device": device, "dtype": dtype}
        shape = (num_embeddings, embedding_dim)
        self.weight = make_param(shape, init_real_rows, rows, 0, **kw)
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
