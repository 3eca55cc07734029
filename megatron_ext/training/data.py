"""Training and validation samples for the pipeline engine.

Every rank builds the same datasets and its own DP rank's micro-batch iterator (DeepSpeed reads
it only on the first and last pipeline stages). The global sample order does not depend on the
DP size (megatron_ext.data.sampler), so a resume from `consumed_samples` continues with exactly
the next sample, at any layout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from megatron_ext.data.blend import build_datasets
from megatron_ext.data.sampler import build_dataloader
from megatron_ext.errors import UserError
from megatron_ext.training.config import RunConfig


def sample_counts(cfg: RunConfig) -> tuple[int, int, int]:
    """(train, valid, test) samples the run asks of the data."""
    train = cfg.train.iterations * cfg.train.global_batch_size
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
