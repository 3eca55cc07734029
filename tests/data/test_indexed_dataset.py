"""MMIDIDX writer/reader: round trips, megatron-core byte compatibility both ways, corruption."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_ext.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    merge_datasets,
    optimal_dtype,
)
from megatron_ext.errors import UserError

mcore_ds = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def random_docs(seed: int, n: int, vocab: int, max_len: int = 50) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(0, max_len)).tolist() for _ in range(n)]


def write_ours(prefix, docs, dtype, eod=None) -> None:
    with IndexedDatasetBuilder(prefix, dtype) as b:
        b.add_documents(docs, eod=eod)
        b.finalize()


def write_mcore(prefix, docs, dtype) -> None:
    import torch

    builder = mcore_ds.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("vocab", [1000, 131072])
def test_byte_identical_to_megatron_core(tmp_path, vocab):
    dtype = optimal_dtype(vocab)
    assert dtype == (np.uint16 if vocab < 65500 else np.int32)
    docs = [d + [2] for d in random_docs(0, 200, vocab)]
    write_ours(tmp_path / "ours", [d[:-1] for d in docs], dtype, eod=2)
    write_mcore(tmp_path / "theirs", docs, dtype.type)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(f"{tmp_path}/ours{ext}", f"{tmp_path}/theirs{ext}", shallow=False)


def test_idx_size_matches_format_note(tmp_path):
    # 20 documents of uint16: 34 + 4*20 + 8*20 + 8*21 = 442 bytes (shared/notes/megatron-core-cpu.md)
    write_ours(tmp_path / "d", random_docs(1, 20, 500), np.uint16)
    assert os.path.getsize(tmp_path / "d.idx") == 442


def test_megatron_core_reads_ours_and_we_read_theirs(tmp_path):
    docs = random_docs(2, 100, 70000)
    write_ours(tmp_path / "ours", docs, np.int32)
    theirs = mcore_ds.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs)
    for i in (0, 1, 50, 99):
        np.testing.assert_array_equal(theirs[i], np.array(docs[i], dtype=np.int32))
    # multi-sequence documents written by megatron-core
    import torch

    builder = mcore_ds.IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    builder.add_document(torch.tensor([1, 2, 3, 4, 5]), [2, 3])
    builder.add_document(torch.tensor([6]), [1])
    builder.finalize(str(tmp_path / "mc.idx"))
    ours = IndexedDataset(tmp_path / "mc")
    assert ours.num_documents == 2 and len(ours) == 3
    np.testing.assert_array_equal(ours.document(0), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ours[1], [3, 4, 5])
    np.testing.assert_array_equal(ours.get(1, offset=1, length=2), [4, 5])
    # and our add_document with several sequences writes what megatron-core writes
    with IndexedDatasetBuilder(tmp_path / "ours_mc", np.uint16) as b:
        b.add_document([1, 2, 3, 4, 5], [2, 3])
        b.add_document([6], [1])
        b.finalize()
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(f"{tmp_path}/ours_mc{ext}", f"{tmp_path}/mc{ext}", shallow=False)


def test_token_out_of_range_refused_and_abort_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not fit dtype uint16"):
        with IndexedDatasetBuilder(tmp_path / "x", np.uint16) as b:
            b.add_documents([[1, 2], [70000]])
    assert os.listdir(tmp_path) == []


def corrupt_cases():
    def truncate_idx(p):
        with open(f"{p}.idx", "r+b") as f:
            f.truncate(os.path.getsize(f"{p}.idx") - 3)

    def bad_magic(p):
        with open(f"{p}.idx", "r+b") as f:
            f.write(b"XXXXXXX")

    def truncate_bin(p):
        with open(f"{p}.bin", "r+b") as f:
            f.truncate(os.path.getsize(f"{p}.bin") - 2)

    def bad_pointer(p):
        with open(f"{p}.idx", "r+b") as f:  # second sequence pointer (after 10 int32 lengths)
            f.seek(34 + 4 * 10 + 8)
            f.write(np.int64(12345).tobytes())

    def bad_doc_index(p):
        with open(f"{p}.idx", "r+b") as f:  # last document boundary
            f.seek(os.path.getsize(f"{p}.idx") - 8)
            f.write(np.int64(3).tobytes())

    def empty_idx(p):
        open(f"{p}.idx", "wb").close()

    return {
        "truncated idx": (truncate_idx, "truncated or corrupt"),
        "bad magic": (bad_magic, "bad magic"),
        "truncated bin": (truncate_bin, "truncated or mismatched"),
        "bad pointer": (bad_pointer, "byte offset of sequence 1"),
        "bad document index": (bad_doc_index, "document boundaries"),
        "empty idx": (empty_idx, "too short"),
    }


@pytest.mark.parametrize("case", list(corrupt_cases()))
def test_corrupt_files_detected(tmp_path, case):
    corrupt, message = corrupt_cases()[case]
    prefix = tmp_path / "d"
    write_ours(prefix, [[1, 2, 3]] * 10, np.uint16)
    corrupt(prefix)
    with pytest.raises(UserError, match=message):
        IndexedDataset(prefix)
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext", "inspect", str(prefix)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert str(prefix) in proc.stderr and "Traceback" not in proc.stderr


def test_merge_keeps_documents_and_refuses_dtype_mismatch(tmp_path):
    a, b = random_docs(3, 30, 1000), random_docs(4, 40, 1000)
    write_ours(tmp_path / "a", a, np.uint16)
    write_ours(tmp_path / "b", b, np.uint16)
    merged = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "m"))
    assert merged.num_documents == 70
    for i, doc in enumerate(a + b):
        np.testing.assert_array_equal(merged.document(i), doc)
    write_ours(tmp_path / "all", a + b, np.uint16)
    assert filecmp.cmp(tmp_path / "all.bin", tmp_path / "m.bin", shallow=False)
    assert filecmp.cmp(tmp_path / "all.idx", tmp_path / "m.idx", shallow=False)

    write_ours(tmp_path / "wide", a, np.int32)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_ext",
            "merge-datasets",
            "--inputs",
            str(tmp_path / "a"),
            str(tmp_path / "wide"),
            "--output-prefix",
            str(tmp_path / "bad"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "different dtypes" in proc.stderr
    assert not list(tmp_path.glob("bad*"))


def test_inspect_reports_counts(tmp_path):
    write_ours(tmp_path / "d", [[5, 6, 7], [8]], np.uint16, eod=0)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_ext",
            "inspect",
            str(tmp_path / "d"),
            "--json",
            "--decode",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    info = json.loads(proc.stdout)
    assert info["documents"] == 2 and info["tokens"] == 6 and info["dtype"] == "uint16"
    assert info["ids"] == [8, 0]
    assert info["document_length_percentiles"]["p100"] == 4
