"""S5 training throughput through the real trainer, against the plain-loop baseline; S6 a
Llama shape with SDPA (flash) attention through the trainer.

The trainer runs `python -m megatron_ext train model.preset=P ...` on a synthetic dataset and is
stopped (SIGKILL: a 3B model's final checkpoint would take longer than the steps) once it has
logged the steps asked for; the figures are medians over the rows after the warm-up steps
(the first steps compile kernels and allocate the optimizer state). The micro-batch is the
largest candidate the planner's memory estimate fits into 85% of the device. MFU uses the
device's datasheet bf16 peak (megatron_ext.verify.common.PEAK_BF16_TFLOPS; none on CPU).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace

import torch

from megatron_ext import precision
from megatron_ext.models.config import ModelConfig
from megatron_ext.verify.baseline import plain_loop
from megatron_ext.verify.common import (
    SectionContext,
    median,
    peak_tflops,
    write_synthetic_dataset,
)
from megatron_ext.verify.trainer_runs import TrainerRun, run_trainer

MEMORY_FRACTION = 0.85
ROW_FIGURES = ("tokens_per_s", "tflops_per_device", "hw_tflops_per_device", "mfu")


@dataclass(frozen=True)
class ThroughputPlan:
    preset: str
    seq: int
    micro_batches: tuple[int, ...]  # candidates, largest first
    accumulation: int  # micro-batches per step
    steps: int  # trainer steps logged
    warmup: int  # rows dropped from the medians
    precision: str
    overrides: tuple[str, ...] = ()


S5_GPU = ThroughputPlan("fingpt-3b", 2048, (4, 2, 1), 8, 8, 3, "bf16")
S5_GPU_EXTRA = replace(S5_GPU, preset="fingpt-1.5b")
S5_DRY = ThroughputPlan("tiny", 64, (4,), 8, 3, 1, "fp32")
# Llama-3-8B's layer (GQA 32/8 heads, SwiGLU, RoPE, head dim 128) at 8 layers: fits one
# device with ZeRO-1 and its fp32 master weights
S6_GPU = ThroughputPlan("llama-3-8b", 2048, (2, 1), 4, 6, 2, "bf16",
                        ("model.num_layers=8", "model.attention_backend=sdpa"))  # fmt: skip
S6_DRY = ThroughputPlan("tiny-llama", 64, (4,), 2, 3, 1, "fp32", ("model.attention_backend=sdpa",))


def model_config(plan: ThroughputPlan) -> ModelConfig:
    """The ModelConfig the trainer will build from the plan's model.* overrides."""
    from megatron_ext.config import apply_overrides
    from megatron_ext.models.presets import resolve_model_config

    data = {"model": {"preset": plan.preset}}
    apply_overrides(data, [o for o in plan.overrides if o.startswith("model.")])
    config = resolve_model_config(data["model"])
    config.seq_length = plan.seq
    return config


def candidates(plan: ThroughputPlan, device: torch.device) -> tuple[list[int], float | None]:
    """The candidate micro-batches from the largest whose estimated memory fits down, and that
    estimate (GiB); on CPU the first candidate alone."""
    if device.type != "cuda":
        return [plan.micro_batches[0]], None
    from megatron_ext.planner.memory import Layout, estimate_memory

    config = model_config(plan)
    budget = MEMORY_FRACTION * torch.cuda.get_device_properties(0).total_memory
    for i, mbs in enumerate(plan.micro_batches):
        est = estimate_memory(config, Layout(1, 1, 1, mbs), plan.seq, mbs * plan.accumulation,
                              plan.precision, attention_scores=_keeps_scores(config, device))  # fmt: skip
        if est.total <= budget or i == len(plan.micro_batches) - 1:
            return list(plan.micro_batches[i:]), round(est.total / 2**30, 1)
    raise AssertionError("unreachable")


def _keeps_scores(config: ModelConfig, device: torch.device) -> bool:
    """Whether the backend `auto` stands for keeps [s, s] scores (our softmax kernel does)."""
    try:
        from megatron_ext.models.core_attention import resolve_backend
    except ImportError:
        return config.attention_backend != "sdpa"
    pos = config.position_embedding
    return resolve_backend(config.attention_backend, device, pos, 0.0) == "softmax"


def trainer_overrides(plan: ThroughputPlan, mbs: int, data, peak: float | None) -> list[str]:
    return [f"model.preset={plan.preset}", *plan.overrides, f"data.path={data}",
            f"data.seq_length={plan.seq}", f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={mbs * plan.accumulation}",
            f"train.precision={plan.precision}", "train.activation_checkpointing=none",
            f"train.iterations={plan.steps + 2}", "checkpoint.interval=100000",
            *([f"logging.peak_tflops={peak}"] if peak else [])]  # fmt: skip


def _out_of_memory(run: TrainerRun) -> bool:
    text = run.log_tail(20000)
    return "OutOfMemoryError" in text or "out of memory" in text


def trainer_throughput(ctx: SectionContext, plan: ThroughputPlan, label: str) -> dict:
    """Run the trainer for `plan.steps` steps (a smaller micro-batch after an OOM, while time
    is left); medians of its metrics after the warm-up rows."""
    device = ctx.device()
    sizes, estimate = candidates(plan, device)
    tokens = (plan.steps + 2) * sizes[0] * plan.accumulation * (plan.seq + 1)
    docs = max(64, tokens // 1000)
    data = write_synthetic_dataset(ctx.data_prefix(f"seq{plan.seq}-{docs}docs"), docs, 1500)
    peak = peak_tflops(torch.cuda.get_device_name(0)) if device.type == "cuda" else None
    figures = {"preset": plan.preset, "seq": plan.seq, "accumulation": plan.accumulation,
               "precision": plan.precision, "memory_estimate_gib": estimate,
               "peak_tflops_assumed": peak, "oom_at_micro_batch": []}  # fmt: skip
    for mbs in sizes:
        ckpt = ctx.path(f"{label}-ckpt")
        shutil.rmtree(ckpt, ignore_errors=True)
        overrides = trainer_overrides(plan, mbs, data, peak)
        run = run_trainer(ctx, label, ckpt, overrides, stop_after_steps=plan.steps)
        if run.returncode == 0 or not _out_of_memory(run) or ctx.remaining() < 30:
            break
        figures["oom_at_micro_batch"].append(mbs)
    run.check(f"{ctx.name} trainer run ({plan.preset}, micro-batch {mbs})")
    figures |= {"micro_batch": mbs, "trainer_seconds": round(run.seconds, 1)}
    return figures | row_figures(run.rows, plan)


def row_figures(rows: list[dict], plan: ThroughputPlan) -> dict:
    """Medians of the metrics rows after the warm-up steps; the largest peak memory."""
    kept = [r for r in rows if r.get("step", 0) > plan.warmup][: plan.steps - plan.warmup]
    figures = {"steps_measured": len(kept)}
    for key in ROW_FIGURES:
        figures[key] = median([r.get(key) for r in kept])
    figures["peak_memory_gb"] = max((r.get("peak_memory_gb") or 0 for r in kept), default=None)
    figures["losses"] = [round(r["loss"], 4) for r in rows if r.get("loss") is not None]
    return figures


def section_throughput(ctx: SectionContext) -> dict:
    """S5: trainer, plain loop, engine overhead, profile; the 1.5B preset if time is left."""
    plan = S5_DRY if ctx.dry_run else S5_GPU
    figures = trainer_throughput(ctx, plan, "trainer")
    ctx.partial({"trainer": figures})
    dtype = precision.DTYPES[plan.precision]
    measured = max(1, figures["steps_measured"])
    try:
        figures |= plain_loop(ctx, model_config(plan), figures["micro_batch"], plan.accumulation,
                              measured, min(2, plan.warmup + 1), dtype)  # fmt: skip
    except Exception as exc:  # e.g. an OOM: the trainer's figures stand, the section fails
        figures |= {"plain_error": f"{type(exc).__name__}: {exc}"[:800], "status": "failed"}
    plain, ours = figures.get("plain_tokens_per_s"), figures.get("tokens_per_s")
    figures["engine_overhead"] = 1 - ours / plain if plain and ours else None
    ctx.partial({"plain": {k: v for k, v in figures.items() if k.startswith("plain")}})
    if not ctx.dry_run and ctx.remaining() > 1.2 * figures["trainer_seconds"]:
        try:
            figures["extra_preset"] = [trainer_throughput(ctx, S5_GPU_EXTRA, "trainer-1.5b")]
        except RuntimeError as exc:
            figures["extra_preset"] = [{"preset": S5_GPU_EXTRA.preset, "error": str(exc)[:500]}]
    return figures


def section_llama(ctx: SectionContext) -> dict:
    """S6: a Llama shape (RoPE, SwiGLU, GQA) with SDPA attention through the trainer."""
    plan = S6_DRY if ctx.dry_run else S6_GPU
    config = model_config(plan)
    figures = trainer_throughput(ctx, plan, "trainer")
    shape = {"num_layers": config.num_layers, "hidden_size": config.hidden_size,
             "heads": config.num_attention_heads, "kv_heads": config.num_kv_heads,
             "ffn_hidden_size": config.ffn_hidden_size, "vocab_size": config.vocab_size,
             "attention_backend": config.attention_backend}  # fmt: skip
    return {"overrides": list(plan.overrides), "shape": shape, **figures}
