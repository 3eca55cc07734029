"""Megatron MMIDIDX v1 indexed datasets: `PREFIX.bin` (tokens) and `PREFIX.idx` (index).

Byte-compatible with megatron-core's `IndexedDataset` / `IndexedDatasetBuilder`:
the writer is C++ (`megatron_ext._data_cpp`), the reader is a validated NumPy memmap.
Output is always written under temporary names and renamed on success, so a failed
run never leaves a `.bin`/`.idx` pair under the final prefix.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
HEADER_SIZE = 9 + 8 + 1 + 8 + 8

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """uint16 below 65,500 tokens (as megatron-core decides), else int32."""
    return (
        np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)
    )


def data_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.bin"


def index_file_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}.idx"


def _cpp():
    from megatron_ext import _data_cpp  # built ahead of time by setup.py

    return _data_cpp


class IndexedDatasetBuilder:
    """Streams documents to `PREFIX.bin`; `finalize()` writes `PREFIX.idx` and publishes both.

    Until `finalize()` both files live under `PREFIX.{bin,idx}.tmp-PID`; `abort()` (or leaving
    a `with` block by an exception) deletes them.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.int32):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} cannot be stored in an MMIDIDX dataset")
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = data_file_path(self.prefix) + suffix
        self._tmp_idx = index_file_path(self.prefix) + suffix
        self._writer = _cpp().IndexedDatasetWriter(self._tmp_bin, CODE_OF_DTYPE[self.dtype])
        self._done = False

    def add_documents(self, docs, eod: int | None = None) -> None:
        """Append documents (sequences of token ids), each as one sequence, + `eod` if given."""
        self._writer.add_documents(docs, -1 if eod is None else int(eod))

    def add_packed(self, tokens: bytes, lengths: np.ndarray) -> None:
        """Append tokens already packed in this dataset's dtype; `lengths[i]` make document i."""
        self._writer.add_packed(tokens, lengths)

    def add_document(self, tokens, lengths) -> None:
        """megatron-core's API: one document made of sequences of the given lengths."""
        self._writer.add_document(
            np.asarray(tokens, dtype=self.dtype), np.asarray(lengths, dtype=np.int64)
        )

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._writer.add_document(arr, np.array([arr.size], dtype=np.int64))

    def append_dataset(self, prefix: str | os.PathLike) -> None:
        """Append every document of an existing dataset with the same dtype."""
        prefix = os.fspath(prefix)
        try:
            self._writer.append_dataset(index_file_path(prefix), data_file_path(prefix))
        except RuntimeError as exc:
            raise UserError(str(exc)) from None

    @property
    def num_documents(self) -> int:
        return self._writer.num_documents

    @property
    def num_tokens(self) -> int:
        return self._writer.num_tokens

    def finalize(self) -> None:
        """Write the index and rename both files to their final names (the .idx last)."""
        self._writer.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, data_file_path(self.prefix))
        os.replace(self._tmp_idx, index_file_path(self.prefix))
        self._done = True

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._done:
            return
        self._writer.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    num_sequences: int
    num_doc_indices: int


def _read_header(idx_path: str) -> IndexHeader:
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_SIZE)
    if len(head) < HEADER_SIZE:
        raise UserError(f"{idx_path}: {size} bytes is too short for an MMIDIDX index (truncated?)")
    if head[:9] != MAGIC:
        raise UserError(f"{idx_path}: not an MMIDIDX index (bad magic {head[:9]!r})")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != 1:
        raise UserError(f"{idx_path}: unsupported MMIDIDX version {version}")
    code = head[17]
    if code not in DTYPE_CODES:
        raise UserError(f"{idx_path}: unknown dtype code {code}")
    n, d = struct.unpack("<QQ", head[18:34])
    expected = HEADER_SIZE + 4 * n + 8 * n + 8 * d
    if size not in (expected, expected + n):  # + n: megatron-core's optional int8 sequence modes
        raise UserError(
            f"{idx_path}: header says {n} sequences and {d} document boundaries "
            f"({expected} bytes) but the file has {size} bytes: truncated or corrupt"
        )
    return IndexHeader(DTYPE_CODES[code], int(n), int(d))


class IndexedDataset:
    """Read-only view of `PREFIX.bin`/`PREFIX.idx`, checked for consistency on open.

    `ds[i]` is sequence i as a NumPy array; `ds.document(j)` is document j (its sequences joined).
    A truncated or corrupt pair raises `UserError` naming the file and what does not add up.
    """

    def __init__(self, prefix: str | os.PathLike, full_check: bool = True):
        """`full_check=False` checks only sizes (for re-opening a pair already checked, e.g. in
        DataLoader workers); the full check scans every offset in bounded-memory chunks."""
        self.prefix = os.fspath(prefix)
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(f"{path}: no such file (is '{self.prefix}' the right prefix?)")
        header = _read_header(idx_path)
        self.dtype = header.dtype
        n, d = header.num_sequences, header.num_doc_indices
        offset = HEADER_SIZE
        self._idx = (
            np.memmap(idx_path, mode="r", dtype=np.uint8) if os.path.getsize(idx_path) else None
        )
        raw = self._idx if self._idx is not None else np.zeros(0, np.uint8)
        self.sequence_lengths = raw[offset : offset + 4 * n].view(np.int32)
        offset += 4 * n
        self.sequence_pointers = raw[offset : offset + 8 * n].view(np.int64)
        offset += 8 * n
        self.document_indices = raw[offset : offset + 8 * d].view(np.int64)
        self._check(idx_path, bin_path, full_check)
        bin_size = os.path.getsize(bin_path)
        self._bin = (
            np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)
        )

    def _check(self, idx_path: str, bin_path: str, full: bool = True) -> None:
        """Sizes always; with `full`, every offset and boundary too (in bounded-memory chunks)."""
        lengths, itemsize, n = (
            self.sequence_lengths,
            self.dtype.itemsize,
            self.sequence_lengths.size,
        )
        if full and n and int(lengths.min()) < 0:
            raise UserError(
                f"{idx_path}: negative sequence length at sequence {int(np.argmin(lengths))}"
            )
        if full:
            total_bytes = int(lengths.sum(dtype=np.int64)) * itemsize
        else:  # from the last offset: no pass over 1e9 lengths when re-opening in a worker
            total_bytes = int(self.sequence_pointers[-1]) + int(lengths[-1]) * itemsize if n else 0
        bin_size = os.path.getsize(bin_path)
        if total_bytes != bin_size:
            raise UserError(
                f"{bin_path}: {bin_size} bytes but {idx_path} describes {total_bytes} "
                f"({total_bytes // itemsize} tokens of {self.dtype}): truncated or mismatched pair"
            )
        docs = self.document_indices
        if docs.size == 0 or docs[0] != 0 or docs[-1] != n:
            raise UserError(
                f"{idx_path}: document boundaries are not 0..{n} ascending: corrupt index"
            )
        if not full:
            return
        chunk, offset = 1 << 24, 0
        for start in range(0, n, chunk):
            part = lengths[start : start + chunk].astype(np.int64) * itemsize
            expected = offset + np.concatenate(([0], np.cumsum(part[:-1])))
            bad = np.flatnonzero(expected != self.sequence_pointers[start : start + chunk])
            if bad.size:
                raise UserError(
                    f"{idx_path}: byte offset of sequence {start + int(bad[0])} is inconsistent: "
                    "corrupt index"
                )
            offset = int(expected[-1] + part[-1])
        for start in range(0, docs.size - 1, chunk):
            if (np.diff(docs[start : start + chunk + 1]) < 0).any():
                raise UserError(
                    f"{idx_path}: document boundaries are not 0..{n} ascending: corrupt index"
                )

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return np.asarray(self._bin[start : start + int(self.sequence_lengths[i])])

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence i (megatron-core's `get`)."""
        seq_len = int(self.sequence_lengths[i])
        length = seq_len - offset if length is None else length
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        return np.asarray(self._bin[start : start + length])

    def document(self, j: int) -> np.ndarray:
        if not 0 <= j < self.num_documents:
            raise UserError(
                f"{self.prefix}: document {j} out of range (0..{self.num_documents - 1})"
            )
        first, last = int(self.document_indices[j]), int(self.document_indices[j + 1])
        if first == last:
            return np.zeros(0, self.dtype)
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        count = int(self.sequence_lengths[first:last].sum(dtype=np.int64))
        return np.asarray(self._bin[start : start + count])


def merge_datasets(inputs: list[str], output_prefix: str) -> IndexedDataset:
    """Concatenate datasets of the same dtype, keeping document boundaries; atomic output."""
    if not inputs:
        raise UserError("merge-datasets needs at least one input prefix")
    datasets = [IndexedDataset(p) for p in inputs]  # validates each pair before writing anything
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) > 1:
        described = ", ".join(f"{ds.prefix} ({ds.dtype})" for ds in datasets)
        raise UserError(
            f"cannot merge datasets of different dtypes: {described}; re-tokenize with one tokenizer"
        )
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetBuilder(output_prefix, datasets[0].dtype) as builder:
        for ds in datasets:
            builder.append_dataset(ds.prefix)
        builder.finalize()
    return IndexedDataset(output_prefix)
