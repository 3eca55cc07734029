"""Tensor-parallel communication as autograd functions (Megatron's mappings, explicit groups).

Every function takes the TP `group` it communicates over; a group of size 1 (or None) makes
it the identity. Shapes: "last dim" functions split/gather the hidden (feature) dimension of
[..., h]; "sequence" functions split/gather dimension 0 of [s, b, h].

| function | forward | backward |
|---|---|---|
| copy_to_tp_region | identity | all-reduce |
| reduce_from_tp_region | all-reduce | identity |
| scatter_to_tp_region | keep own last-dim chunk | all-gather last dim |
| gather_from_tp_region | all-gather last dim | keep own chunk |
| scatter_to_sequence_parallel_region | keep own dim-0 chunk | all-gather dim 0 |
| gather_from_sequence_parallel_region | all-gather dim 0 | reduce-scatter dim 0 (or chunk) |
| reduce_scatter_to_sequence_parallel_region | reduce-scatter dim 0 | all-gather dim 0 |
"""

from __future__ import annotations

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None

# torch >= 2.13 names them *_single; older versions (cluster builds) only have *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group: Group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce into a new tensor (never in place: the input may be saved by autograd)."""
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


def _split_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[-1] % size:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the TP size {size}")
    return x.chunk(size, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group: Group) -> torch.Tensor:
    stacked = _gather_first(x.unsqueeze(0), group)  # [size, ...]: the collective works on dim 0
    return torch.cat(stacked.unbind(0), dim=-1)


def _split_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[0] % size:
        raise ValueError(
            f"sequence length {x.shape[0]} is not divisible by the TP size {size}; sequence "
            "parallelism needs seq_length % tp_size == 0"
        )
    return x.chunk(size, dim=0)[group_rank(group)].contiguous()


def _gather_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    x = x.contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group: Group) -> torch.Tensor:
    size = group_size(group)
    if x.shape[0] % size:
        raise ValueError(f"dimension 0 ({x.shape[0]}) is not divisible by the TP size {size}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // size, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, grad_reduce_scatter):
        ctx.group, ctx.grad_reduce_scatter = group, grad_reduce_scatter
        return _gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_reduce_scatter:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_first(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient over `group` in backward."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """All-reduce (sum) over `group` in forward; identity backward."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., h] -> own chunk [..., h/tp]; backward all-gathers the last dimension."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., h/tp] -> [..., h] by all-gather; backward keeps this rank's chunk."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


def scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, ...] -> own chunk [s/tp, ...]; backward all-gathers dimension 0."""
    return x if group_size(group) == 1 else _ScatterToSP.apply(x, group)


def gather_from_sequence_parallel_region(
    x: torch.Tensor, group: Group, grad_reduce_scatter: bool = True
) -> torch.Tensor:
    """[s/tp, ...] -> [s, ...] by all-gather.

    Backward reduce-scatters (the consumer is TP-split, e.g. a column-parallel linear, so each
    rank holds a partial gradient of the full sequence) or, with grad_reduce_scatter=False,
    keeps this rank's chunk (the consumer is replicated).
    """
    if group_size(group) == 1:
        return x
    return _GatherFromSP.apply(x, group, grad_reduce_scatter)


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Partial sums [s, ...] -> reduced own chunk [s/tp, ...]; backward all-gathers dim 0."""
    return x if group_size(group) == 1 else _ReduceScatterToSP.apply(x, group)
