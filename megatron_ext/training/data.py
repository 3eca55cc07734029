"""Training and validation samples for the pipeline engine.

Every rank builds the same datasets and its own DP rank's micro-batch iterator (DeepSpeed reads
it only on the first and last pipeline stages). The global sample order does not depend on the
DP size (megatron_ext.data.sampler), so a resume from `consumed_samples` continues with exactly
the next sample, at any layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from megatron_ext.data.blend import build_datasets
from megatron_ext.data.sampler import build_dataloader
from megatron_ext.errors import UserError
from megatron_ext.training.config import RunConfig


class SkippedSamples:
    """train.skip_samples: the sample stream without the ranges [start, end) of global sample
    indices (sorted, not overlapping). Stream position p (what consumed_samples counts) reads
    global index `index(p)`, so a run that skips [a, b) trains exactly as a run whose data never
    held those samples: the same batches, ramp-up and schedule."""

    def __init__(self, ranges: list[list[int]] | None):
        self.ranges = [(int(a), int(b)) for a, b in ranges or []]

    def total(self) -> int:
        return sum(b - a for a, b in self.ranges)

    def index(self, position: int) -> int:
        for a, b in self.ranges:
            if position < a:
                break
            position += b - a
        return position

    def global_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The global index ranges that stream positions [start, end) read."""
        out: list[tuple[int, int]] = []
        for p in range(start, end):  # one batch: a few thousand positions at most
            i = self.index(p)
            if out and out[-1][1] == i:
                out[-1] = (out[-1][0], i + 1)
            else:
                out.append((i, i + 1))
        return out


class _WithoutSkipped(torch.utils.data.Dataset):
    def __init__(self, dataset, skipped: SkippedSamples):
        self.dataset, self.skipped = dataset, skipped
        self.prefix = getattr(dataset, "prefix", "dataset")
        self.length = len(dataset) - sum(
            max(0, min(b, len(dataset)) - a) for a, b in skipped.ranges
        )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int):
        return self.dataset[self.skipped.index(position)]


def merge_skips(*lists) -> list[list[int]] | None:
    """The union of skip_samples lists, sorted, overlapping or touching ranges joined."""
    merged: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for ranges in lists for a, b in ranges or []):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged or None


def without_skipped(dataset, ranges: list[list[int]] | None):
    """DATASET as the stream that never held train.skip_samples (itself when none)."""
    return _WithoutSkipped(dataset, SkippedSamples(ranges)) if ranges else dataset


def sample_counts(cfg: RunConfig) -> tuple[int, int, int]:
    """(train, valid, test) samples the run asks of the data (skipped ones included)."""
    train = cfg.train.iterations * cfg.train.global_batch_size
    train += SkippedSamples(cfg.train.skip_samples).total()
    evals = (
        cfg.train.iterations // cfg.logging.eval_interval + 1 if cfg.logging.eval_interval else 0
    )
    valid = evals * cfg.logging.eval_iters * cfg.train.global_batch_size
    return train, valid, 0


def build_run_datasets(cfg: RunConfig, counts: tuple[int, int, int] | None = None) -> tuple:
    """(train, valid, test) datasets of `data.path` or `data.blend` (None for an empty split)."""
    cache = cfg.data.cache_dir or os.path.join(cfg.checkpoint.dir, "index-cache")
    return build_datasets(
        cfg.data.blend or cfg.data.path,
        cfg.data.seq_length,
        counts or sample_counts(cfg),
        split=cfg.data.split,
        seed=cfg.data.seed,
        cache_dir=cache,
    )


def micro_batches(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    vocab_size: int | None = None,
) -> Iterator[tuple]:
    """(tokens [b, s], labels [b, s]) int64 micro-batches of this DP rank, from consumed_samples.

    With `vocab_size`, a token id outside the model's vocabulary is a UserError naming the
    dataset (a tokenizer/model mismatch), not an index error deep in the embedding."""
    loader = build_dataloader(
        dataset,
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=num_workers,
    )
    for batch in loader:
        if vocab_size is not None and int(batch["labels"].max()) >= vocab_size:
            raise UserError(
                f"{getattr(dataset, 'prefix', 'dataset')}: token id {int(batch['labels'].max())} "
                f"is outside the model's vocabulary of {vocab_size}; set model.vocab_size to the "
                "tokenizer's size or re-tokenize"
            )
        yield batch["tokens"], batch["labels"]
