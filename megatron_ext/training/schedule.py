"""Learning-rate schedule (linear warmup, then cosine/linear decay to a floor) and batch ramp-up."""

from __future__ import annotations

import math

from megatron_ext.training.config import OptimConfig, TrainConfig


def learning_rate(step: int, optim: OptimConfig, total_iters: int) -> float:
    """LR for optimizer step `step` (0-based): BLOOM used 6e-5 -> 6e-6 cosine."""
    if optim.warmup_iters > 0 and step < optim.warmup_iters:
        return optim.lr * (step + 1) / optim.warmup_iters
    if optim.decay_style == "constant":
        return optim.lr
    decay_iters = optim.decay_iters if optim.decay_iters is not None else total_iters
    span = max(1, decay_iters - optim.warmup_iters)
    progress = min(1.0, max(0.0, (step - optim.warmup_iters) / span))
    if optim.decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def global_batch_size(consumed_samples: int, train: TrainConfig) -> int:
    """The global batch of the step after `consumed_samples`: Megatron's ramp-up grows it from
    start by increment every samples / ((global - start) / increment) consumed samples."""
    if not train.rampup_batch_size:
        return train.global_batch_size
    start, increment, ramp_samples = train.rampup_batch_size
    increments = (train.global_batch_size - start) // increment
    if increments == 0:
        return train.global_batch_size
    per_increment = ramp_samples / increments
    size = start + increment * int(consumed_samples / per_increment)
    return min(train.global_batch_size, size)
