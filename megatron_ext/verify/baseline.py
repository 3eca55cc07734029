"""The engine-overhead baseline of S5: the same model in a plain PyTorch loop, and a profile of
one of its steps.

The plain loop is `megatron_ext.models.build_model` (no pipeline engine, no ZeRO, no data
loader): weights in the run's dtype (bf16 on the GPU, no fp32 master copy), torch AdamW
(`fused=True` on CUDA), the same micro-batch and number of micro-batches per step, random
token batches made once on the device. Its tokens/s is what the model alone reaches on this
device, so `1 - trainer / plain` is what the engine (DeepSpeed pipeline + ZeRO-1 + data path +
fp32 master weights) costs. The weights are initialised on the device (normal 0.02; norms 1,
biases 0): the values do not change the time a step takes, and 3B parameters initialised on
the host would take longer than the steps measured.
"""

from __future__ import annotations

import time

import torch

from megatron_ext.models.config import ModelConfig
from megatron_ext.verify.common import SectionContext, median

TOP_KERNELS = 15


def build_plain_model(
    config: ModelConfig, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    from megatron_ext.models.model import build_model

    model = build_model(config, device="meta", dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, config.init_std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.train()


def make_batches(
    config: ModelConfig, micro_batch: int, count: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` micro-batches of (input_ids, labels) [micro_batch, s], random token ids."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1, min(1000, config.vocab_size), (count, micro_batch, config.seq_length + 1),
                        generator=gen)  # fmt: skip
    ids = ids.to(device)
    return [(ids[i, :, :-1], ids[i, :, 1:]) for i in range(count)]


def train_step(model, optimizer, batches) -> float:
    """One optimizer step over the micro-batches (gradient accumulation); the mean loss."""
    total = 0.0
    for input_ids, labels in batches:
        loss = model(input_ids, labels).mean() / len(batches)
        loss.backward()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(
    ctx: SectionContext, config: ModelConfig, micro_batch: int, accumulation: int,
    measured_steps: int, warmup_steps: int, dtype: torch.dtype,
) -> dict:  # fmt: skip
    """tokens/s (median over `measured_steps` after `warmup_steps`) of the plain loop, and
    the top kernels of one more profiled step (when time is left)."""
    device = ctx.device()
    model = build_plain_model(config, device, dtype)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda"
    )
    batches = make_batches(config, micro_batch, accumulation, device)
    tokens = micro_batch * accumulation * config.seq_length
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup_steps + measured_steps):
        if ctx.remaining() < 10 and len(times) >= 1:
            break
        _sync(device)
        began = time.perf_counter()
        losses.append(train_step(model, optimizer, batches))
        _sync(device)
        if i >= warmup_steps:
            times.append(time.perf_counter() - began)
    step_s = median(times)
    figures = {"plain_tokens_per_s": tokens / step_s if step_s else None,
               "plain_steps_measured": len(times), "plain_step_s": step_s,
               "plain_losses": [round(x, 4) for x in losses],
               "plain_peak_memory_gb": _peak_gb(device)}  # fmt: skip
    if ctx.remaining() > 3 * (step_s or 1) + 10:
        try:
            figures["plain_top_kernels"] = profile_step(model, optimizer, batches, device)
        except Exception as exc:  # a profiler that cannot start (CUPTI) costs only the table
            figures["plain_profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def profile_step(model, optimizer, batches, device: torch.device) -> list[dict]:
    """The top kernels (GPU) or ops (CPU) of one plain step by own time: name, ms, share."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        train_step(model, optimizer, batches)
        _sync(device)
    return top_events(prof.key_averages(), device.type == "cuda")


def top_events(averages, on_device: bool, n: int = TOP_KERNELS) -> list[dict]:
    """Events with their own (self) time, largest first; on a GPU the kernels' device time
    (CPU-side ops have none of their own), on CPU the ops' CPU time."""
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    events = [(e.key, float(getattr(e, key, 0.0) or 0.0), e.count) for e in averages]
    events = [e for e in events if e[1] > 0]
    total = sum(t for _, t, _ in events) or 1.0
    events.sort(key=lambda e: e[1], reverse=True)
    return [{"name": name[:120], "ms": round(us / 1e3, 3), "share": round(us / total, 4),
             "calls": calls} for name, us, calls in events[:n]]  # fmt: skip
