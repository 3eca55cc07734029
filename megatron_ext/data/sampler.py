"""Which samples each data-parallel rank reads, and the DataLoader that reads them.

The sample stream is global: sample i is `dataset[i]`, whatever the DP size, worker count or
restart. Training consumes it in order; one step of all DP ranks takes `micro_batch_size *
dp_size` consecutive samples per micro-batch, rank r the r-th slice of them. Resuming from a
consumed-sample count (saved with the checkpoint) continues with exactly the next sample, also
after a change of DP size.

DataLoader workers start with the spawn method: forked workers crashed with pipeline parallel
in the older stacks (CUDA/RCCL state copied into the child).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.errors import UserError


@dataclass
class MicroBatchSampler:
    """Yields this rank's micro-batches as lists of global sample indices (a batch_sampler).

    Micro-batch m (counted from `consumed_samples`) of rank r holds samples
    `consumed + m * micro_batch_size * dp_size + r * micro_batch_size + [0, micro_batch_size)`.
    A last incomplete round (fewer than `micro_batch_size * dp_size` samples) is dropped, so
    every rank takes the same number of steps.
    """

    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __post_init__(self) -> None:
        if self.micro_batch_size < 1 or self.dp_size < 1:
            raise UserError(
                "micro_batch_size and dp_size must be >= 1 "
                f"(got {self.micro_batch_size}, {self.dp_size})"
            )
        if not 0 <= self.dp_rank < self.dp_size:
            raise UserError(f"dp_rank {self.dp_rank} is outside 0..{self.dp_size - 1}")
        if not 0 <= self.consumed_samples <= self.total_samples:
            raise UserError(
                f"consumed_samples {self.consumed_samples} is outside 0..{self.total_samples}: "
                "was the checkpoint made with another dataset size?"
            )

    @property
    def round_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.round_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for m in range(len(self)):
            start = first + m * self.round_size
            yield list(range(start, start + self.micro_batch_size))


def collate_samples(samples: list[dict]) -> dict:
    """Stack a list of sample dicts into int64 torch tensors `[micro_batch_size, seq_length]`."""
    import torch

    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def build_dataloader(
    dataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 2,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
):
    """A torch DataLoader over this rank's micro-batches (spawned workers, none when 0)."""
    from torch.utils.data import DataLoader

    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    extra = {}
    if num_workers > 0:
        extra = {"multiprocessing_context": "spawn", "persistent_workers": True}
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_samples,
        pin_memory=pin_memory,
        # its own generator: starting an iterator draws a seed, and from the default generator
        # that draw would shift every dropout mask after a resume (the checkpoint restores the
        # default generator before the loader first runs)
        generator=torch.Generator().manual_seed(0),
        **extra,
    )
