"""Chunked vocab-parallel cross entropy: chunk-size independence, bf16, memory, collectives.

Every case is compared with torch.nn.functional.cross_entropy in fp32 on the real columns of
the same values (for bf16 logits: the bf16 values upcast), in the contiguous [s, b, v] layout
and in the model's [b, s, v] transpose of it. A dispatch-mode probe records the largest tensor
of each dtype that any op allocates, and the c10d all-reduces, so the tests see what the
function creates and sends, not only what it returns.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from megatron_ext.parallel import ParallelContext
from megatron_ext.parallel.tensor_parallel import vocab_parallel_cross_entropy
from megatron_ext.parallel.tensor_parallel.cross_entropy import CHUNK_NUMEL
from tests.distributed_utils import run_distributed_test

S, B, PADDED = 7, 3, 64  # 21 tokens: chunks of 4 rows leave a short last chunk


class _Probe(TorchDispatchMode):
    """Every storage newly allocated by an op, as (dtype, elements), and the all-reduces run."""

    def __init__(self):
        super().__init__()
        self.allocs, self.all_reduces = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name == "c10d::allreduce_":
            self.all_reduces += 1
        inputs = tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.allocs.append((t.dtype, t.untyped_storage().nbytes() // t.element_size()))
        return out

    def over(self, numel: int) -> list[tuple[torch.dtype, int]]:
        return [a for a in self.allocs if a[1] > numel]


def _inputs(dtype, vocab, seed=0, transposed=False):
    """logits [S, B, PADDED] (or their [B, S, PADDED] transpose), target, grad of the loss."""
    torch.manual_seed(seed)
    logits = (torch.randn(S, B, PADDED) * 3).to(dtype)
    target, grad_loss = torch.randint(0, vocab, (S, B)), torch.rand(S, B)
    if transposed:
        return logits.transpose(0, 1), target.t().contiguous(), grad_loss.t().contiguous()
    return logits, target, grad_loss


def _reference(logits, target, grad_loss, label_smoothing, vocab):
    """fp32 loss [...] and gradient [..., PADDED] (zero on padding) from torch."""
    real = logits[..., :vocab].float().requires_grad_()
    loss = F.cross_entropy(
        real.reshape(-1, vocab),
        target.reshape(-1),
        reduction="none",
        label_smoothing=label_smoothing,
    ).view(target.shape)
    loss.backward(grad_loss)
    grad = torch.zeros(logits.shape)
    grad[..., :vocab] = real.grad
    return loss.detach(), grad


def _ours(logits, target, grad_loss, **kwargs):
    local = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, **kwargs)
    loss.backward(grad_loss)
    assert loss.dtype == torch.float32 and local.grad.dtype == logits.dtype
    return loss.detach(), local.grad


def _check_grad(grad, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(grad, ref, atol=1e-5, rtol=1e-5)
    else:  # our fp32 gradient rounded once to bf16: within bf16's unit roundoff
        torch.testing.assert_close(grad.float(), ref, atol=1e-6, rtol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("vocab", [PADDED, 50])
@pytest.mark.parametrize("transposed", [False, True])
def test_chunked_matches_torch_and_one_chunk(dtype, label_smoothing, vocab, transposed):
    logits, target, grad_loss = _inputs(dtype, vocab, transposed=transposed)
    ref_loss, ref_grad = _reference(logits, target, grad_loss, label_smoothing, vocab)
    kw = dict(label_smoothing=label_smoothing, vocab_size=vocab)
    whole_loss, whole_grad = _ours(logits, target, grad_loss, **kw)
    for rows in (1, 3, 4):  # chunk_numel=1 still takes one row per chunk
        loss, grad = _ours(logits, target, grad_loss, chunk_numel=rows * PADDED - 1, **kw)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, whole_loss, atol=1e-6, rtol=1e-6)
        _check_grad(grad, ref_grad, dtype)
        _check_grad(grad.float(), whole_grad.float(), dtype)
    torch.testing.assert_close(whole_loss, ref_loss, atol=1e-5, rtol=1e-5)
    _check_grad(whole_grad, ref_grad, dtype)
    assert torch.all(whole_grad[..., vocab:] == 0)
    assert whole_loss.is_contiguous() and whole_grad.stride() == logits.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_no_copy_of_the_whole_logits(dtype, transposed):
    """Forward: nothing beyond one chunk. Backward: only the gradient, in the logits' dtype."""
    logits, target, grad_loss = _inputs(dtype, 50, transposed=transposed)
    chunk, whole = 3 * PADDED, S * B * PADDED
    local = logits.clone().requires_grad_()
    kw = dict(label_smoothing=0.1, vocab_size=50, chunk_numel=chunk)
    with _Probe() as fwd:
        loss = vocab_parallel_cross_entropy(local, target, **kw)
    with _Probe() as bwd:
        loss.backward(grad_loss)
    assert fwd.over(chunk) == [] and bwd.over(chunk) == [(dtype, whole)], (fwd.allocs, bwd.allocs)
    scratch = (torch.float32, (chunk // 50) * 50)  # the one chunk buffer: 3 rows of real columns
    assert scratch in fwd.allocs and scratch in bwd.allocs
    with _Probe() as probe:  # the probe does see a whole-size upcast (what the old code did)
        logits.to(torch.float32, copy=True)
    assert probe.over(chunk) == [(torch.float32, whole)]


def test_default_chunk_size_and_a_bad_one():
    assert CHUNK_NUMEL <= 2**26
    with pytest.raises(ValueError, match="chunk_numel"):
        vocab_parallel_cross_entropy(
            torch.randn(2, 4), torch.zeros(2, dtype=torch.long), chunk_numel=0
        )


def _tp_chunk_worker(rank, world_size):
    ctx = ParallelContext.from_sizes(world_size)
    for dtype in (torch.float32, torch.bfloat16):
        for ls, vocab in ((0.0, 50), (0.1, 50), (0.2, 10)):  # vocab 10: rank 1 is all padding
            bf16 = dtype == torch.bfloat16  # bf16 in the model's [b, s, v] layout
            logits, target, grad_loss = _inputs(dtype, vocab, seed=vocab, transposed=bf16)
            ref_loss, ref_grad = _reference(logits, target, grad_loss, ls, vocab)
            local = logits.chunk(world_size, dim=-1)[rank]
            kw = dict(label_smoothing=ls, vocab_size=vocab, chunk_numel=3 * PADDED // world_size)
            x = local.clone().requires_grad_()
            with _Probe() as fwd:
                loss = vocab_parallel_cross_entropy(x, target, ctx.tp_group, **kw)
            with _Probe() as bwd:
                loss.backward(grad_loss)
            assert (fwd.all_reduces, bwd.all_reduces) == (2, 0)
            torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
            _check_grad(x.grad, ref_grad.chunk(world_size, dim=-1)[rank], dtype)
    return True


@pytest.mark.distributed
def test_chunked_cross_entropy_at_tp2():
    assert all(run_distributed_test(_tp_chunk_worker, 2))


@pytest.mark.gpu
def test_fingpt_vocabulary_on_gpu_keeps_fp32_to_one_chunk():
    """V = 131,072 bf16 logits of 4096 tokens (1 GiB; an fp32 copy would be 2 GiB more): the
    peak during forward + backward stays below logits + gradient + 2 chunks + slack."""
    import torch.nn.functional as F

    from megatron_ext.parallel.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator("cuda").manual_seed(0)
    logits = torch.randn(4096, 131072, device="cuda", generator=g).bfloat16().requires_grad_()
    target = torch.randint(0, 131072, (4096,), device="cuda", generator=g)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = vocab_parallel_cross_entropy(logits, target, chunk_numel=1 << 24)
    loss.mean().backward()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < logits.numel() * 2 + 2 * (1 << 24) * 4 + (64 << 20), peak / 2**30
    ref = F.cross_entropy(logits.detach().float(), target, reduction="none")
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
