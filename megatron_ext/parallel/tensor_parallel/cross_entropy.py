"""Cross entropy over vocabulary-parallel logits, with padding masked and correct smoothing.

Shapes: logits [..., V_padded/tp] (any dtype; computed in fp32), target [...] int64 global
token ids -> loss [...] fp32, one value per token (mask and average in the caller).

Columns at or beyond `vocab_size` (vocabulary padding) are excluded: they get probability 0,
no gradient, and do not count in the label-smoothing average. Label smoothing follows
`torch.nn.functional.cross_entropy`: the target distribution is (1 - e) * onehot + e / V over
the V real tokens, so

    loss = (1 - e) * (-log p[target]) + e * mean_over_V(-log p).

The smoothing term is all-reduced over the TP group; megatron-core 0.16 uses the local shard
only, which is wrong for TP > 1. Collectives: forward all-reduces MAX once (the per-token
max) and SUM once (the target logit, the partition function and, with smoothing, the logit
sum, in one [k, N] buffer); backward none.

Memory (N tokens, v = V_padded/tp): the logits are never copied whole to fp32. They are read
as rows [N, v] with the leading dimensions in memory order: a view for any dense layout (e.g.
the model's [b, s, v] transpose of [s, b, v]; a non-dense one is copied in its own dtype,
once per pass). The forward takes the per-token max in the logits' own dtype (exact), then
walks chunks of whole rows, each upcast into one reused fp32 buffer of at most `chunk_numel`
elements (one row if a row is larger). Saved for backward: the logits themselves (no copy),
the per-token max and log-partition (fp32 [N] each) and the local target index and mask
([N]). The backward recomputes the softmax chunk by chunk in the same kind of buffer and
writes the gradient straight into a tensor of the logits' dtype and layout. Peak fp32 extra
in either pass: one chunk (2**26 elements = 256 MiB by default) plus O(N). Rows are never
split, so the chunk size changes results at most by fp32 rounding order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.parallel.tensor_parallel.mappings import Group, group_rank, group_size

CHUNK_NUMEL = 1 << 26  # fp32 elements per chunk: 256 MiB of scratch, a few rows at V ~ 1e5


def _memory_order(logits: torch.Tensor) -> list[int]:
    """Leading dims, outermost in memory first: dense logits permuted so flatten to a view."""
    return sorted(range(logits.dim() - 1), key=lambda d: -logits.stride(d))


def _as_rows(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[...] -> [N] or [..., v] -> [N, v], leading dims taken in `order`."""
    if t.dim() == len(order):
        return t.permute(order).reshape(-1)
    return t.permute([*order, t.dim() - 1]).reshape(-1, t.shape[-1])


def _from_rows(rows: torch.Tensor, order: list[int], shape: torch.Size) -> torch.Tensor:
    """Inverse of _as_rows: a view of rows [N(, v)] with `shape`, in the layout of order."""
    dims = [*order, *range(len(order), len(shape))]
    back = sorted(range(len(dims)), key=dims.__getitem__)
    return rows.view([shape[d] for d in dims]).permute(back)


def _row_chunks(num_rows: int, width: int, chunk_numel: int) -> list[slice]:
    """Row slices of [num_rows, width] with at most chunk_numel elements each (>= one row)."""
    rows = max(1, chunk_numel // max(width, 1))
    return [slice(lo, min(lo + rows, num_rows)) for lo in range(0, num_rows, rows)]


def _scratch(num_rows: int, width: int, chunk_numel: int, like: torch.Tensor) -> torch.Tensor:
    """The one fp32 chunk buffer [rows, width], reused by every chunk."""
    rows = min(num_rows, max(1, chunk_numel // max(width, 1)))
    return torch.empty((rows, width), dtype=torch.float32, device=like.device)


def _shifted(real: torch.Tensor, row_max: torch.Tensor, rows: slice, buf: torch.Tensor):
    """fp32 [r, valid] = logits - max for one chunk, written into (a prefix of) buf."""
    chunk = real[rows]
    # copy_ then sub_: a mixed-dtype torch.sub(out=) is several times slower on CPU
    return buf[: chunk.shape[0]].copy_(chunk).sub_(row_max[rows].unsqueeze(-1))


def _row_max(real: torch.Tensor) -> torch.Tensor:
    """[N] fp32 max over this shard's real columns (-inf for a shard of padding only)."""
    if real.shape[-1] == 0:
        return torch.full(real.shape[:1], float("-inf"), device=real.device)
    return real.amax(dim=-1).to(torch.float32)  # in the logits' dtype: exact, no fp32 copy


def _local_stats(real, row_max, local_target, in_shard, smoothing: bool, chunk_numel: int):
    """[k, N] fp32 shard sums after the max shift: target logit, (logit sum,) sum of exp."""
    num_rows, valid = real.shape
    packed = torch.zeros((3 if smoothing else 2, num_rows), device=real.device)
    if valid == 0:  # a shard of padding only contributes nothing
        return packed
    buf = _scratch(num_rows, valid, chunk_numel, real)
    for rows in _row_chunks(num_rows, valid, chunk_numel):
        x = _shifted(real, row_max, rows, buf)
        packed[0, rows] = x.gather(-1, local_target[rows].unsqueeze(-1)).squeeze(-1)
        if smoothing:
            packed[1, rows] = x.sum(dim=-1)
        packed[-1, rows] = x.exp_().sum(dim=-1)
    packed[0].masked_fill_(~in_shard, 0.0)
    return packed


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, vocab_size, chunk_numel):
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
        valid = min(max(vocab_size - start, 0), v_local)  # real columns in this shard
        order = _memory_order(logits)
        real = _as_rows(logits, order)[:, :valid]  # a view for dense logits
        flat_target = _as_rows(target, order)
        in_shard = (flat_target >= start) & (flat_target < start + valid)
        local_target = (flat_target - start).masked_fill(~in_shard, 0)

        row_max = _row_max(real)
        if group_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        smoothing = label_smoothing > 0
        packed = _local_stats(real, row_max, local_target, in_shard, smoothing, chunk_numel)
        if group_size(group) > 1:
            dist.all_reduce(packed, group=group)
        log_z = torch.log(packed[-1])
        loss = log_z - packed[0]
        if smoothing:
            mean_log_p = packed[1] / vocab_size - log_z
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_p

        ctx.save_for_backward(logits, row_max, log_z, local_target, in_shard)
        ctx.label_smoothing, ctx.vocab_size, ctx.valid = label_smoothing, vocab_size, valid
        ctx.chunk_numel, ctx.order = chunk_numel, order
        return _from_rows(loss, order, target.shape).contiguous()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, row_max, log_z, local_target, in_shard = ctx.saved_tensors
        ls, valid = ctx.label_smoothing, ctx.valid
        flat = _as_rows(logits, ctx.order)
        grad = torch.empty_like(flat)  # in the logits' dtype
        grad[:, valid:] = 0.0  # padding columns get no gradient
        if valid > 0:
            # d loss / d logit = g * (softmax - (1 - e) * onehot - e / V), per-row factors first
            g = _as_rows(grad_loss, ctx.order).to(torch.float32)
            prob_scale = (g * torch.exp(-log_z)).unsqueeze(-1)  # g / Z
            hit = (in_shard * g * -(1.0 - ls)).unsqueeze(-1)
            smooth = (g * (ls / ctx.vocab_size)).unsqueeze(-1)
            real, num_rows = flat[:, :valid], flat.shape[0]
            buf = _scratch(num_rows, valid, ctx.chunk_numel, flat)
            for rows in _row_chunks(num_rows, valid, ctx.chunk_numel):
                p = _shifted(real, row_max, rows, buf).exp_().mul_(prob_scale[rows])
                p.scatter_add_(-1, local_target[rows].unsqueeze(-1), hit[rows])
                if ls > 0:
                    p.sub_(smooth[rows])
                grad[rows, :valid] = p
        return _from_rows(grad, ctx.order, logits.shape), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: Group = None,
    *,
    label_smoothing: float = 0.0,
    vocab_size: int | None = None,
    chunk_numel: int = CHUNK_NUMEL,
) -> torch.Tensor:
    """Per-token loss [...] (fp32) from vocab-parallel logits [..., V_padded/tp].

    vocab_size: the real vocabulary (columns beyond it are padding); None = no padding.
    chunk_numel: fp32 elements per row chunk (at least one row is taken); bounds the fp32
    scratch of forward and backward. Forward: one MAX and one SUM all-reduce over `group`;
    backward: none. The gradient has the logits' dtype.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on the "
            "leading dimensions"
        )
    if chunk_numel < 1:
        raise ValueError(f"chunk_numel must be a positive number of elements, got {chunk_numel}")
    padded = logits.shape[-1] * group_size(group)
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {padded}]")
    return _VocabParallelCrossEntropy.apply(
        logits, target, group, label_smoothing, vocab_size, chunk_numel
    )
