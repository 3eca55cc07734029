"""Cross entropy over vocabulary-parallel logits, with padding masked and correct smoothing.

Shapes: logits [..., V_padded/tp] (any dtype; computed in fp32), target [...] int64 global
token ids -> loss [...] fp32, one value per token (mask and average in the caller).

Columns at or beyond `vocab_size` (vocabulary padding) are excluded: they get probability 0,
no gradient, and do not count in the label-smoothing average. Label smoothing follows
`torch.nn.functional.cross_entropy`: the target distribution is (1 - e) * onehot + e / V over
the V real tokens, so

    loss = (1 - e) * (-log p[target]) + e * mean_over_V(-log p).

The smoothing term is all-reduced over the TP group; megatron-core 0.16 uses the local shard
only, which is wrong for TP > 1. Collectives: forward all-reduces MAX once and SUM once (the
target logit, the partition function and, with smoothing, the logit sum, in one buffer);
backward none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.parallel.tensor_parallel.mappings import Group, group_rank, group_size


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, label_smoothing, vocab_size):
        v_local = logits.shape[-1]
        start = group_rank(group) * v_local
        valid = min(max(vocab_size - start, 0), v_local)  # real columns in this shard
        x = logits.to(torch.float32, copy=True)  # overwritten in place with the softmax below
        if valid < v_local:
            x[..., valid:] = float("-inf")

        local_max = x.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
        x.sub_(local_max.unsqueeze(-1))

        in_shard = (target >= start) & (target < start + valid)
        local_target = (target - start).masked_fill(~in_shard, 0)
        target_logit = x.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(~in_shard, 0.0)
        stats = [target_logit]
        if label_smoothing > 0:
            stats.append(x[..., :valid].sum(dim=-1))  # sum of shifted logits over real columns
        x.exp_()
        stats.append(x.sum(dim=-1))
        packed = torch.stack(stats)
        if group_size(group) > 1:
            dist.all_reduce(packed, group=group)
        sum_exp = packed[-1]
        log_z = torch.log(sum_exp)
        loss = log_z - packed[0]
        if label_smoothing > 0:
            mean_log_p = packed[1] / vocab_size - log_z
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_p

        x.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(x, local_target, in_shard)
        ctx.label_smoothing, ctx.vocab_size, ctx.valid = label_smoothing, vocab_size, valid
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_shard = ctx.saved_tensors
        ls = ctx.label_smoothing
        grad = softmax  # reused in place: backward runs once
        hit = in_shard.to(grad.dtype) * (1.0 - ls)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.unsqueeze(-1))
        if ls > 0:
            grad[..., : ctx.valid] -= ls / ctx.vocab_size
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: Group = None,
    *,
    label_smoothing: float = 0.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token loss [...] (fp32) from vocab-parallel logits [..., V_padded/tp].

    vocab_size: the real vocabulary (columns beyond it are padding); None = no padding.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree on the "
            "leading dimensions"
        )
    padded = logits.shape[-1] * group_size(group)
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {padded}]")
    return _VocabParallelCrossEntropy.apply(logits, target, group, label_smoothing, vocab_size)
