"""S4: the core-attention backends on q/k/v directly (`megatron_ext.models.core_attention`).

For each backend (softmax, sdpa, flex) x positions (alibi, rope) x head dim x sequence length,
batch 1, causal: forward + backward time (median of N after warm-up; CUDA events on a GPU),
the peak memory the call adds, and the output's max abs error against the fp32 pure-PyTorch
softmax reference on the same inputs. "rope" rotates q and k before core attention, so here it
is core attention without a bias. softmax and sdpa run first for every shape, flex (compiled
per shape on a GPU) afterwards, so a section stopped by its cap keeps the cheap cases; each case
is kept as a partial record when it finishes. A backend missing from the code or refused by the
config is recorded as unavailable with the error, not as a failed section.

Dry run: fp32, s=64, head dims 8/16, 2 heads; flex forward only (torch has no CPU backward).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import torch

from megatron_ext.verify.common import SectionContext

BACKENDS = ("softmax", "sdpa", "flex")
POSITIONS = ("alibi", "rope")
MIN_CASE_S = 3.0  # stop starting cases this close to the deadline


class Shape(NamedTuple):
    seq: int
    head_dim: int
    heads: int
    position: str  # alibi | rope


@dataclass(frozen=True)
class AttentionPlan:
    seqs: tuple[int, ...]
    heads_by_dim: dict[int, int]  # head dim -> heads (h = heads x head dim)
    dtype: torch.dtype
    warmup: int
    iters: int


GPU_PLAN = AttentionPlan((2048, 4096), {128: 20, 80: 32, 86: 24}, torch.bfloat16, 3, 10)
DRY_PLAN = AttentionPlan((64,), {8: 2, 16: 2}, torch.float32, 1, 2)


def section_attention(ctx: SectionContext) -> dict:
    device = ctx.device()
    plan = DRY_PLAN if ctx.dry_run else GPU_PLAN
    try:
        from megatron_ext.models import core_attention as ca
    except ImportError as exc:
        return {"available": False, "error": f"megatron_ext.models.core_attention: {exc}"}
    shapes = [Shape(s, hn, np_, pos) for s in plan.seqs for hn, np_ in plan.heads_by_dim.items()
              for pos in POSITIONS]  # fmt: skip
    inputs: dict = {}
    cases = []
    allow_recompiles()
    for backends in (("softmax", "sdpa"), ("flex",)):  # flex compiles: after the cheap ones
        for shape in shapes:
            for backend in backends:
                case = run_case(ctx, ca, backend, shape, plan, device, inputs)
                ctx.partial(case)
                cases.append(case)
    return {"device": str(device), "dtype": str(plan.dtype).removeprefix("torch."),
            "batch": 1, "warmup": plan.warmup, "iters": plan.iters,
            "config_backends": config_backends(), "cases": cases,
            "cases_ok": sum(c["status"] == "ok" for c in cases)}  # fmt: skip


def config_backends() -> dict[str, str]:
    """Whether `model.attention_backend: B` passes the config's validation, per backend."""
    from megatron_ext.models.config import ModelConfig

    out = {}
    for backend in ("auto", *BACKENDS):
        try:
            ModelConfig.from_dict({"attention_backend": backend})
            out[backend] = "accepted"
        except Exception as exc:  # the message says why the config refuses it
            out[backend] = f"refused: {str(exc)[:160]}"
    return out


def make_inputs(shape: Shape, device: torch.device, cache: dict) -> tuple:
    """fp32 q, k, v [1, np, s, hn], ALiBi slopes or None, the fp32 reference output and the
    output gradient, made once per shape."""
    if shape in cache:
        return cache[shape]
    from megatron_ext.models.attention import alibi_slopes
    from megatron_ext.models.core_attention import core_attention

    s, hn, np_, pos = shape
    gen = torch.Generator(device="cpu").manual_seed(s * 1000 + hn)
    q, k, v, grad = (torch.randn(1, np_, s, hn, generator=gen).to(device) for _ in range(4))
    slopes = alibi_slopes(np_).to(device) if pos == "alibi" else None
    with torch.no_grad():
        ref = core_attention(q, k, v, backend="softmax", alibi_slopes=slopes, use_fused=False)
    cache.clear()  # one shape's tensors at a time
    cache[shape] = (q, k, v, slopes, ref, grad)
    return cache[shape]


def run_case(
    ctx: SectionContext, ca: ModuleType, backend: str, shape: Shape, plan: AttentionPlan,
    device: torch.device, cache: dict,
) -> dict:  # fmt: skip
    """One case's record: its figures, or why it did not run (unavailable, error, no time)."""
    case = {"backend": backend, **shape._asdict()}
    if backend not in getattr(ca, "BACKENDS", ()):
        return case | {"status": "unavailable", "error": f"core_attention has no {backend!r}"}
    if ctx.remaining() < MIN_CASE_S:
        return case | {"status": "not run", "error": "section time cap reached"}
    try:
        return case | bench(ca.core_attention, backend, shape, plan, device, cache)
    except Exception as exc:  # one case's failure (OOM, compile error) is a figure
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return case | {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:400]}


def bench(
    fn: Callable, backend: str, shape: Shape, plan: AttentionPlan, device: torch.device,
    cache: dict,
) -> dict:  # fmt: skip
    """Time forward (+ backward where it exists), peak memory and error for one case."""
    q32, k32, v32, slopes, ref, grad32 = make_inputs(shape, device, cache)
    backward = not (backend == "flex" and device.type == "cpu")
    q, k, v = (t.to(plan.dtype).requires_grad_(backward) for t in (q32, k32, v32))
    grad = grad32.to(plan.dtype)

    def step():
        out = fn(q, k, v, backend=backend, alibi_slopes=slopes)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)
        return out

    began = time.perf_counter()  # wall clock: flex's first call compiles on the host
    step()
    _sync(device)
    first_ms = (time.perf_counter() - began) * 1e3
    for _ in range(plan.warmup):
        step()
    times = [timed(step, device)[1] for _ in range(plan.iters)]
    out, peak = peak_memory(step, device)
    err = (out.detach().float() - ref).abs().max().item()
    return {"status": "ok", "pass": "fwd+bwd" if backward else "fwd (no CPU backward)",
            "median_ms": round(statistics.median(times), 4), "first_call_ms": round(first_ms, 1),
            "peak_mib": peak, "max_abs_err": err}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def allow_recompiles(limit: int = 64) -> None:
    """Each flex shape (and each ALiBi slopes tensor) is compiled anew; the default limit of 8
    would send the later shapes to the eager fallback, which times something else."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across releases
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def timed(step: Callable, device: torch.device) -> tuple[torch.Tensor, float]:
    """(result, milliseconds) of one call: CUDA events on a GPU, wall clock on CPU."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = step()
        end.record()
        torch.cuda.synchronize()
        return out, begin.elapsed_time(end)
    began = time.perf_counter()
    out = step()
    return out, (time.perf_counter() - began) * 1e3


def peak_memory(step: Callable, device: torch.device) -> tuple[torch.Tensor, float | None]:
    """(result, MiB the call allocated above what was live before it); None on CPU."""
    if device.type != "cuda":
        return step(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = step()
    torch.cuda.synchronize()
    return out, round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
