"""Keep TP-duplicated parameters bit-identical across TP ranks, and report any drift.

Norm weights/biases, row-parallel biases and learned position embeddings are held in full by
every TP rank (`param.tp_duplicated = True`). Without sequence parallelism their gradients
are mathematically equal on all TP ranks but need not be bitwise equal (reduction order,
kernels), and older stacks drifted apart in bf16 over long runs. With sequence parallelism
each rank only sees its part of the sequence, so the gradients are partial sums.
`allreduce_tp_duplicated_grads` fixes both after backward: SUM under sequence parallelism,
AVERAGE otherwise (equal inputs average to bitwise-equal outputs on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from megatron_ext.parallel.context import ParallelContext
from megatron_ext.parallel.tensor_parallel.mappings import _all_gather_single


def tp_duplicated_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every TP-duplicated parameter, in a fixed order (all ranks agree)."""
    return [(n, p) for n, p in model.named_parameters() if getattr(p, "tp_duplicated", False)]


def allreduce_tp_duplicated_grads(model: nn.Module, ctx: ParallelContext) -> int:
    """All-reduce the .grad of TP-duplicated parameters over the TP group (one collective).

    Call after backward (after the last micro-batch) and before the optimizer step. SUM with
    sequence parallelism, AVERAGE without. Returns the number of gradients reduced.
    """
    grads = [p.grad for _, p in tp_duplicated_parameters(model) if p.grad is not None]
    if ctx.tp_size == 1 or not grads:
        return len(grads)
    for dtype in sorted({g.dtype for g in grads}, key=str):  # one flat buffer per dtype
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=ctx.tp_group)
        if not ctx.sequence_parallel:
            flat.div_(ctx.tp_size)
        offset = 0
        for g in same:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(grads)


def register_tp_duplicated_grad_hooks(
    model: nn.Module, ctx: ParallelContext
) -> list[RemovableHandle]:
    """Alternative to `allreduce_tp_duplicated_grads` for engines that own the step.

    Reduces each gradient contribution as autograd produces it (one small collective per
    parameter per backward), before it is accumulated into .grad.
    """
    if ctx.tp_size == 1:
        return []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out, group=ctx.tp_group)
        return out if ctx.sequence_parallel else out.div_(ctx.tp_size)

    return [p.register_hook(hook) for _, p in tp_duplicated_parameters(model)]


@torch.no_grad()
def check_tp_drift(model: nn.Module, ctx: ParallelContext) -> dict:
    """Compare every TP-duplicated parameter with TP rank 0's copy (collective over TP).

    Returns {"ok": bool, "tp_size", "num_checked", "max_abs_diff": float,
    "drifted": {name: max_abs_diff}} where drifted lists parameters not bitwise equal to
    TP rank 0's on some rank. The same answer on every TP rank.
    """
    params = tp_duplicated_parameters(model)
    report = {"ok": True, "tp_size": ctx.tp_size, "num_checked": len(params), "max_abs_diff": 0.0}
    report["drifted"] = {}
    if ctx.tp_size == 1 or not params:
        return report
    flat = torch.cat([p.detach().float().reshape(-1) for _, p in params])
    gathered = torch.empty(ctx.tp_size * flat.numel(), dtype=flat.dtype, device=flat.device)
    _all_gather_single(gathered, flat, group=ctx.tp_group)
    gathered = gathered.view(ctx.tp_size, -1)
    offset = 0
    for name, p in params:
        block = gathered[:, offset : offset + p.numel()]
        offset += p.numel()
        diff = (block - block[0]).abs().max().item()
        if not all(torch.equal(block[r], block[0]) for r in range(1, ctx.tp_size)):
            report["drifted"][name] = diff
            report["max_abs_diff"] = max(report["max_abs_diff"], diff)
    report["ok"] = not report["drifted"]
    return report


@torch.no_grad()
def resync_tp_duplicated(model: nn.Module, ctx: ParallelContext) -> None:
    """Overwrite every TP-duplicated parameter with TP rank 0's copy (broadcast over TP)."""
    if ctx.tp_size == 1:
        return
    for _, p in tp_duplicated_parameters(model):
        dist.broadcast(p.data, src=ctx.tp_src_rank, group=ctx.tp_group)
