"""Loss spikes: judged on the device before the optimizer step, the batch's step skipped.

A step is a spike when its loss or its gradient norm is more than `sigma` standard deviations
above the mean of the last `window` good steps (OLMo-core's SkipStep rule), judged once half the
window is filled; a spike does not enter the window. The judgement is made where both numbers
exist: inside the optimizer step, after DeepSpeed (ZeRO-1 or its BF16_Optimizer) has reduced the
gradients and computed the global norm, and before our AdamW runs. The step's loss (mean over its
micro-batches and data-parallel replicas, as DeepSpeed reports it) comes from the last pipeline
stage, with rank 0's gradient norm, through one small all-reduce of a device tensor (no host read;
every rank judges the same numbers, so all skip or stop together). A skipped step leaves the
weights and Adam's moments and step count as they were: torch's fused AdamW (CUDA/ROCm) takes the
decision as its `found_inf` tensor on the device; on the CPU our AdamW reads it (a CPU tensor).
The trainer reads the flag after `train_batch`, next to the loss it reads anyway. The batch's
samples count as consumed and the learning-rate schedule moves on, as for any step.

After `max_spikes` spikes within `max_spikes_window` steps the run saves and stops (exit 3)
naming the steps and their samples, for a rollback (`megatron-ext rollback`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_ext.log import get_logger

log = get_logger(__name__)


class LossSpikeError(RuntimeError):
    """Too many loss spikes close together: the run saved and stopped."""


class SkippableAdamW(torch.optim.AdamW):
    """torch's AdamW whose step a SpikeGuard can cancel (`guard`; None: plain AdamW)."""

    guard = None

    def step(self, closure=None):
        guard = self.guard
        if guard is None:
            return super().step(closure)
        skip = guard.decide()
        if not guard.skips:
            return super().step(closure)
        if self.defaults.get("fused"):
            self.found_inf = skip  # the fused kernel skips on the device; step counts kept
            try:
                return super().step(closure)
            finally:
                del self.found_inf
        if skip.item():  # CPU: a CPU tensor, nothing to wait for
            return None
        return super().step(closure)


class SpikeGuard:
    """The rolling window of good steps' loss and gradient norm, on the device.

    `begin(step)` before each train_batch; the optimizer calls `decide()` (once per step:
    DeepSpeed steps each parameter group separately); `spiked()` after train_batch."""

    def __init__(self, cfg, engine, device: torch.device):
        self.cfg, self.engine = cfg, engine
        self.skips = cfg.action == "skip"
        self.values = torch.zeros(2, cfg.window, device=device)  # loss, grad norm
        self.good = torch.zeros(cfg.window, dtype=torch.bool, device=device)
        self.ready_at = max(2, cfg.window // 2)
        self.slot = 0
        self.flag: torch.Tensor | None = None
        self.judged: tuple | None = None
        self.device = device

    def begin(self) -> None:
        self.flag = self.judged = None

    def decide(self) -> torch.Tensor:
        """0-d float32 on the device: 1.0 when this step is a spike (computed once per step)."""
        if self.flag is not None:
            return self.flag
        x = self._loss_and_grad_norm()
        n = self.good.sum()
        kept = torch.where(self.good, self.values, 0.0)
        mean = kept.sum(1) / n.clamp(min=1)
        var = torch.where(self.good, (self.values - mean[:, None]) ** 2, 0.0).sum(1)
        var = var / (n - 1).clamp(min=1)
        limit = mean + self.cfg.sigma * var.sqrt()
        spike = (n >= self.ready_at) & (x > limit).any()  # a NaN grad norm (no norm) never is
        self.values[:, self.slot] = x
        self.good[self.slot] = ~spike & torch.isfinite(x[0])
        self.slot = (self.slot + 1) % self.cfg.window
        self.flag = spike.float()  # 0-d: fused AdamW subtracts it from its 0-d step counts
        self.judged = (x, limit)
        return self.flag

    def _loss_and_grad_norm(self) -> torch.Tensor:
        """[loss, grad norm], the same on every rank (one all-reduce, so every rank judges the
        same numbers): the loss is the last stage's (TP rank 0's) mean over its micro-batches
        averaged over the data-parallel replicas; the grad norm rank 0's (DeepSpeed's global
        norm, which replicas reduce separately and could round apart)."""
        ds, ctx = self.engine.ds, self.engine.ctx
        local = torch.zeros(2, device=self.device)
        if ds.is_last_stage() and ctx.tp_rank == 0 and ds.total_loss is not None:
            loss = ds.total_loss.detach().float().reshape(())
            local[0] = loss / ds.gradient_accumulation_steps() / ctx.dp_size
        if dist.get_rank() == 0:
            norm = getattr(ds.optimizer, "_global_grad_norm", None)
            local[1] = float("nan") if norm is None else torch.as_tensor(norm).reshape(())
        dist.all_reduce(local)
        return local

    def spiked(self) -> dict | None:
        """After train_batch: None, or the spike's loss, grad norm and their limits (host)."""
        if self.flag is None or not self.flag.item():
            return None
        x, limit = (t.tolist() for t in self.judged)
        return {
            "loss": x[0],
            "grad_norm": x[1],
            "loss_limit": limit[0],
            "grad_norm_limit": limit[1],
        }


class SpikeLog:
    """The host's record of spikes: a warning for each, and the stop after too many."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.spikes: list[tuple[int, list[tuple[int, int]]]] = []  # step, sample ranges

    def record(self, step: int, ranges: list[tuple[int, int]], judged: dict, skipped: bool) -> None:
        self.spikes.append((step, ranges))
        if dist.get_rank() != 0:
            return
        log.warning(
            "step %d: loss spike (loss %.4g, limit %.4g; grad norm %.4g, limit %.4g) on samples "
            "%s: %s",
            step,
            judged["loss"],
            judged["loss_limit"],
            judged["grad_norm"],
            judged["grad_norm_limit"],
            _ranges_text(ranges),
            "optimizer step skipped" if skipped else "logged only (train.spikes.action=log)",
        )

    def too_many(self, step: int) -> list | None:
        """The spikes of the last max_spikes_window steps when there are max_spikes of them."""
        k, window = self.cfg.max_spikes, self.cfg.max_spikes_window
        recent = [(s, r) for s, r in self.spikes if s > step - window]
        return recent if k and len(recent) >= k else None

    def stop_message(self, recent: list, root: str, checkpoints: list[str]) -> str:
        """Why the run stops, and the rollback to the newest of CHECKPOINTS before the spikes."""
        listed = "; ".join(f"step {s}: samples {_ranges_text(r)}" for s, r in recent)
        skips = " ".join(f"--skip-samples {a}:{b}" for _, r in recent for a, b in r)
        first = recent[0][0]
        before = [i for i in (int(t.removeprefix("iter_")) for t in checkpoints) if i < first]
        to = (
            f"megatron-ext rollback --checkpoint {root} --to {max(before)} {skips}, then resume"
            if before
            else f"no checkpoint is older than step {first} to roll back to"
        )
        return (
            f"{len(recent)} loss spikes within {self.cfg.max_spikes_window} steps ({listed}). "
            f"To train on without those samples: {to}"
        )


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"[{a}, {b})" for a, b in ranges)


def install(cfg, engine) -> SpikeGuard | None:
    """The SpikeGuard of a run (None with action=none), handed to its AdamW inside DeepSpeed's
    optimizer wrapper (ZeRO-1 and BF16_Optimizer both keep it as `.optimizer`)."""
    if cfg.action == "none":
        return None
    wrapper = engine.ds.optimizer
    adamw = getattr(wrapper, "optimizer", wrapper)
    if not isinstance(adamw, SkippableAdamW):
        raise TypeError(f"the spike guard needs SkippableAdamW inside DeepSpeed, found {adamw!r}")
    adamw.guard = SpikeGuard(cfg, engine, engine.ctx.device)
    return adamw.guard
