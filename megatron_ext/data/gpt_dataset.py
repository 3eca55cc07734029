"""GPT-style training samples over one indexed dataset.

A split (train/valid/test) is a contiguous range of documents (Megatron's `"969,30,1"`
bookends, rounded the same way). For `num_samples` samples of `seq_length + 1` tokens the
split is repeated for as many epochs E as needed; each epoch lists the split's documents in
its own shuffled order, and all epochs form one token stream. Sample k is
`stream[k*L : k*L + L + 1]`, so it runs across document boundaries, and `tokens`/`labels`
are its first/last L tokens. Samples are shuffled within the epoch they start in (so epoch e
is used up before any sample of epoch e + 1): `ds[i]` is stream sample `shuffle_index[i]`.

Indices (all int64 except the document index, int32 while document ids fit):
- `document_index` `[E * num_split_documents]`: document ids, epoch after epoch;
- `sample_index` `[total_samples + 1, 2]`: (position in document_index, offset) per sample start;
- `shuffle_index` `[num_samples]`: sample numbers in reading order.
Everything depends only on the dataset files, the split, seq_length, num_samples and seed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from megatron_ext.data import index_helpers
from megatron_ext.data.index_cache import IndexCache, file_fingerprint
from megatron_ext.data.indexed_dataset import IndexedDataset, data_file_path, index_file_path
from megatron_ext.errors import UserError

SPLITS = ("train", "valid", "test")
INDEX_VERSION = 1  # bump when the index algorithms change: old caches then miss
_DOC_SALT, _SAMPLE_SALT = 0x646F63, 0x73616D


@dataclass
class GPTDatasetConfig:
    """How samples are cut from indexed datasets. `split`: Megatron's train,valid,test weights."""

    seq_length: int
    seed: int = 1234
    split: str = "969,30,1"
    cache_dir: str | None = None  # None: indices are built in memory and not kept
    lock_timeout: float | None = None  # seconds to wait for another rank's build; None: forever

    def __post_init__(self) -> None:
        if self.seq_length < 1:
            raise UserError(f"seq_length must be at least 1 (got {self.seq_length})")
        parse_split(self.split)

    def index_cache(self) -> IndexCache | None:
        return (
            None
            if self.cache_dir is None
            else IndexCache(self.cache_dir, timeout=self.lock_timeout)
        )


def parse_split(split: str) -> list[float]:
    """`"969,30,1"` (or `"98/2"`, `"1"`) -> three normalised fractions for train, valid, test."""
    parts = [p for p in re.split(r"[,/ ]+", str(split).strip()) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"split {split!r}: expected up to three numbers like 969,30,1") from None
    if not 1 <= len(values) <= 3 or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"split {split!r}: expected up to three non-negative numbers like 969,30,1")
    values += [0.0] * (3 - len(values))
    weights = np.array(values, dtype=np.float64)
    if weights.sum() <= 0:
        raise UserError(f"split {split!r}: all parts are zero")
    return (weights / weights.sum()).tolist()  # as megatron-core normalises (same roundings)


def split_document_ranges(num_documents: int, split: str) -> dict[str, tuple[int, int]]:
    """Document range [begin, end) of each split; the same rounding as megatron-core."""
    fractions = parse_split(split)
    bookends = [0.0]
    for f in fractions:
        bookends.append(bookends[-1] + f)
    return {
        name: (int(round(bookends[i] * num_documents)), int(round(bookends[i + 1] * num_documents)))
        for i, name in enumerate(SPLITS)
    }


def document_sizes(ds: IndexedDataset) -> np.ndarray:
    """Tokens per document: the memory-mapped sequence lengths when each document is one
    sequence (the usual case), else their sums (int32 while every document fits)."""
    n, docs = len(ds), ds.document_indices
    if docs.size == n + 1 and _is_identity(docs):
        return ds.sequence_lengths
    ends = np.cumsum(ds.sequence_lengths, dtype=np.int64)
    ends = np.concatenate([[0], ends])
    sizes = ends[docs[1:]] - ends[docs[:-1]]
    return sizes.astype(np.int32) if sizes.size == 0 or sizes.max() < 2**31 else sizes


def _is_identity(docs: np.ndarray, chunk: int = 1 << 24) -> bool:
    for lo in range(0, docs.size, chunk):
        part = docs[lo : lo + chunk]
        if not np.array_equal(part, np.arange(lo, lo + part.size)):
            return False
    return True


def num_epochs_for(split_tokens: int, seq_length: int, num_samples: int) -> int:
    """Fewest passes E over the split that hold `num_samples` samples (E * T >= n * L + 1)."""
    if num_samples <= 0:
        return 1
    return max(1, -(-(num_samples * seq_length + 1) // split_tokens))


def epoch_sample_bounds(
    split_tokens: int, seq_length: int, num_epochs: int, total: int
) -> np.ndarray:
    """First sample of each epoch (sample k starts at stream position k * seq_length), + total."""
    starts = [min(total, -(-(e * split_tokens) // seq_length)) for e in range(num_epochs)]
    return np.array(starts + [total], dtype=np.int64)


def _fill_range(out: np.ndarray, start: int, chunk: int = 1 << 24) -> None:
    """out[:] = arange(start, start + len(out)) without a full-size temporary."""
    for lo in range(0, out.size, chunk):
        hi = min(lo + chunk, out.size)
        out[lo:hi] = np.arange(start + lo, start + hi, dtype=out.dtype)


def build_gpt_indices(
    sizes: np.ndarray, doc_range: tuple[int, int], seq_length: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """The three indices of one split (see the module docstring); no files involved."""
    begin, end = doc_range
    split_tokens = int(np.sum(sizes[begin:end], dtype=np.int64))
    if split_tokens <= 0:
        raise UserError(f"documents {begin}..{end - 1} hold no tokens")
    epochs = num_epochs_for(split_tokens, seq_length, num_samples)
    per_epoch = end - begin
    document_index = np.empty(epochs * per_epoch, np.int32 if end < 2**31 else np.int64)
    _fill_range(document_index[:per_epoch], begin)
    for e in range(1, epochs):  # every epoch starts as the same range; each is shuffled apart
        document_index[e * per_epoch : (e + 1) * per_epoch] = document_index[:per_epoch]
    index_helpers.shuffle_blocks(
        document_index,
        np.arange(epochs + 1, dtype=np.int64) * per_epoch,
        index_helpers.derive_seed(seed, _DOC_SALT),
    )
    total = index_helpers.max_samples(epochs * split_tokens, seq_length)
    sample_index = index_helpers.build_sample_index(sizes, document_index, seq_length, total)
    shuffle_index = np.arange(total, dtype=np.int64)
    bounds = epoch_sample_bounds(split_tokens, seq_length, epochs, total)
    index_helpers.shuffle_blocks(
        shuffle_index, bounds, index_helpers.derive_seed(seed, _SAMPLE_SALT)
    )
    return {
        "document_index": document_index,
        "sample_index": sample_index,
        "shuffle_index": shuffle_index
        if num_samples == total
        else shuffle_index[:num_samples].copy(),
    }


def dataset_fingerprint(prefix: str) -> dict:
    """What identifies a dataset's content for the cache: path, sizes and mtimes of both files."""
    return {
        "prefix": os.path.abspath(prefix),
        "bin": file_fingerprint(data_file_path(prefix)),
        "idx": file_fingerprint(index_file_path(prefix)),
    }


def index_name(name: str, split: str) -> str:
    """Cache entry name of one split of one source (the hash is appended by the cache)."""
    return f"gpt-{name}-{split}"


def index_description(
    prefix: str, split: str, doc_range: tuple[int, int], num_samples: int, config: GPTDatasetConfig
) -> dict:
    """Everything the indices of one split depend on: what the cache hash is taken of."""
    return {
        "kind": "gpt",
        "version": INDEX_VERSION,
        "dataset": dataset_fingerprint(prefix),
        "split": split,
        "documents": [int(doc_range[0]), int(doc_range[1])],
        "seq_length": config.seq_length,
        "num_samples": int(num_samples),
        "seed": config.seed,
    }


class GPTDataset:
    """`num_samples` samples of one split (documents `doc_range`) of one indexed dataset.

    `ds[i]` -> {"tokens": int64 [seq_length], "labels": int64 [seq_length]} (labels are the
    tokens shifted by one). Picklable without copying data (DataLoader spawn workers reopen
    the memory maps). `indexed` and `sizes` may be passed when the caller has them open.
    """

    def __init__(
        self,
        prefix: str,
        split: str,
        doc_range: tuple[int, int],
        num_samples: int,
        config: GPTDatasetConfig,
        *,
        name: str = "",
        indexed: IndexedDataset | None = None,
        sizes: np.ndarray | None = None,
    ):
        self.prefix, self.split, self.config = os.fspath(prefix), split, config
        self.doc_range, self.num_samples = (int(doc_range[0]), int(doc_range[1])), int(num_samples)
        self.name = name or os.path.basename(self.prefix)
        self.indexed = indexed if indexed is not None else IndexedDataset(self.prefix)
        self.built_index = False  # True when this process built (rather than loaded) the indices
        self.cache_path: str | None = None
        begin, end = self.doc_range
        if self.num_samples > 0 and end <= begin:
            raise UserError(
                f"{self.prefix}: split {config.split!r} leaves the {split} split empty "
                f"({self.indexed.num_documents} documents) but {self.num_samples} samples are "
                "asked of it; change the split or the sample count"
            )
        self._load_indices(sizes)

    def _build(self, sizes: np.ndarray | None) -> dict[str, np.ndarray]:
        sizes = document_sizes(self.indexed) if sizes is None else sizes
        try:
            return build_gpt_indices(
                sizes, self.doc_range, self.config.seq_length, self.num_samples, self.config.seed
            )
        except UserError as exc:
            raise UserError(f"{self.prefix} ({self.split} split): {exc}") from None

    def _load_indices(self, sizes: np.ndarray | None) -> None:
        cache = self.config.index_cache()
        if self.num_samples == 0:
            arrays = {
                "document_index": np.zeros(0, np.int32),
                "sample_index": np.zeros((1, 2), np.int64),
                "shuffle_index": np.zeros(0, np.int64),
            }
        elif cache is None:
            arrays = self._build(sizes)
            self.built_index = True
        else:
            description = index_description(
                self.prefix, self.split, self.doc_range, self.num_samples, self.config
            )
            result = cache.load_or_build(
                index_name(self.name, self.split), description, lambda: self._build(sizes)
            )
            arrays, self.built_index, self.cache_path = (
                result.arrays,
                result.built,
                str(result.path),
            )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_epochs(self) -> int:
        return self.document_index.size // max(1, self.doc_range[1] - self.doc_range[0])

    def sample_tokens(self, i: int) -> np.ndarray:
        """The seq_length + 1 raw tokens of sample i, in the dataset's dtype."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range (0..{self.num_samples - 1})")
        k = int(self.shuffle_index[i])
        (j0, off0), (j1, off1) = self.sample_index[k], self.sample_index[k + 1]
        doc = self.document_index
        if j0 == j1:
            return self.indexed.document(int(doc[j0]))[off0 : off1 + 1].copy()
        parts = [self.indexed.document(int(doc[j0]))[off0:]]
        parts += [self.indexed.document(int(doc[j])) for j in range(j0 + 1, j1)]
        parts.append(self.indexed.document(int(doc[j1]))[: off1 + 1])
        return np.concatenate(parts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        text = self.sample_tokens(int(i)).astype(np.int64)
        return {"tokens": text[:-1], "labels": text[1:]}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["indexed"]
        if self.cache_path is not None:  # reopen the memory maps rather than pickling data
            for key in ("document_index", "sample_index", "shuffle_index"):
                del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.indexed = IndexedDataset(self.prefix, full_check=False)
        if self.cache_path is not None:
            for key in ("document_index", "sample_index", "shuffle_index"):
                setattr(
                    self, key, np.load(os.path.join(self.cache_path, f"{key}.npy"), mmap_mode="r")
                )


def build_gpt_dataset(
    prefix: str, split: str, num_samples: int, config: GPTDatasetConfig, name: str = ""
) -> GPTDataset:
    """One split of one dataset; the split's documents come from `config.split`."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    indexed = IndexedDataset(prefix)
    doc_range = split_document_ranges(indexed.num_documents, config.split)[split]
    return GPTDataset(prefix, split, doc_range, int(num_samples), config, name=name)
