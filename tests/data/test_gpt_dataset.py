"""GPT samples from one indexed dataset: splits, sample contents, epochs, shuffles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from megatron_ext.data import index_helpers as H
from megatron_ext.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    build_gpt_dataset,
    document_sizes,
    parse_split,
    split_document_ranges,
)
from megatron_ext.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_ext.errors import UserError


def make_dataset(
    prefix, num_docs: int, seed: int = 0, max_len: int = 60, dtype=np.uint16, vocab=1000
):
    """A small indexed dataset of random documents (some empty); returns (prefix, docs)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, int(rng.integers(0, max_len))).tolist() for _ in range(num_docs)]
    with IndexedDatasetBuilder(prefix, dtype) as builder:
        builder.add_documents(docs)
        builder.finalize()
    return str(prefix), docs


def reference_samples(docs, doc_range, seq_length, num_samples, seed) -> list[list[int]]:
    """Slow pure-Python samples: epochs of shuffled documents, one stream, shuffled per epoch."""
    begin, end = doc_range
    split_tokens = sum(len(d) for d in docs[begin:end])
    epochs = 1
    while epochs * split_tokens < num_samples * seq_length + 1:
        epochs += 1
    doc_seed, sample_seed = H.derive_seed(seed, 0x646F63), H.derive_seed(seed, 0x73616D)
    order = np.tile(np.arange(begin, end, dtype=np.int64), epochs)
    H.shuffle_blocks_reference(order, [e * (end - begin) for e in range(epochs + 1)], doc_seed)
    stream = [tok for j in order.tolist() for tok in docs[j]]
    total = (len(stream) - 1) // seq_length
    bounds = [min(total, -(-e * split_tokens // seq_length)) for e in range(epochs)] + [total]
    shuffle = H.shuffle_blocks_reference(np.arange(total, dtype=np.int64), bounds, sample_seed)
    return [
        stream[k * seq_length : k * seq_length + seq_length + 1]
        for k in shuffle[:num_samples].tolist()
    ]


def test_split_ranges_like_megatron():
    assert split_document_ranges(1000, "969,30,1") == {
        "train": (0, 969),
        "valid": (969, 999),
        "test": (999, 1000),
    }
    assert split_document_ranges(10, "1") == {"train": (0, 10), "valid": (10, 10), "test": (10, 10)}
    assert split_document_ranges(7, "98/2") == {"train": (0, 7), "valid": (7, 7), "test": (7, 7)}
    config = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_config")
    for split in ("969,30,1", "90,5,5", "1,1,1", "33.3,33.3,33.4", "0,1,0"):
        for n in (0, 1, 7, 100, 12345):
            matrix = config.convert_split_vector_to_split_matrix(
                config.parse_and_normalize_split(split)
            )
            ours = split_document_ranges(n, split)
            for name, bookends in zip(("train", "valid", "test"), matrix, strict=True):
                if bookends is None:
                    assert ours[name][0] == ours[name][1]
                else:
                    assert ours[name] == (round(bookends[0] * n), round(bookends[1] * n))


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0", "nan"])
def test_bad_split_strings(bad):
    with pytest.raises(UserError, match="split"):
        parse_split(bad)


@pytest.mark.parametrize("seq_length,num_samples", [(8, 50), (16, 400), (5, 7)])
def test_samples_match_slow_reference(tmp_path, seq_length, num_samples):
    prefix, docs = make_dataset(tmp_path / "ds", 60, seed=seq_length)
    config = GPTDatasetConfig(seq_length=seq_length, seed=11, split="80,15,5")
    for split in ("train", "valid"):
        ds = build_gpt_dataset(prefix, split, num_samples, config)
        expected = reference_samples(docs, ds.doc_range, seq_length, num_samples, seed=11)
        assert len(ds) == num_samples
        for i in range(num_samples):
            sample = ds[i]
            assert sample["tokens"].dtype == np.int64 and sample["tokens"].shape == (seq_length,)
            np.testing.assert_array_equal(sample["tokens"], expected[i][:-1])
            np.testing.assert_array_equal(sample["labels"], expected[i][1:])


def test_epochs_are_used_up_in_order(tmp_path):
    prefix, docs = make_dataset(tmp_path / "ds", 20, seed=1)
    ds = build_gpt_dataset(prefix, "train", 300, GPTDatasetConfig(seq_length=8, split="1"))
    tokens = sum(len(d) for d in docs)
    assert ds.num_epochs == -(-(300 * 8 + 1) // tokens) > 2
    n = len(docs)
    for e in range(ds.num_epochs):  # each epoch lists every document once
        np.testing.assert_array_equal(np.sort(ds.document_index[e * n : (e + 1) * n]), np.arange(n))
    first_of_epoch1 = -(-tokens // 8)
    assert ds.shuffle_index[:first_of_epoch1].max() == first_of_epoch1 - 1  # epoch 0 first


def test_documents_of_several_sequences(tmp_path):
    prefix = str(tmp_path / "multi")
    rng = np.random.default_rng(5)
    docs = []
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for _ in range(30):
            lengths = rng.integers(0, 20, int(rng.integers(1, 4)))
            tokens = rng.integers(0, 100_000, int(lengths.sum()))
            builder.add_document(tokens, lengths)
            docs.append(tokens.tolist())
        builder.finalize()
    np.testing.assert_array_equal(document_sizes(IndexedDataset(prefix)), [len(d) for d in docs])
    ds = build_gpt_dataset(prefix, "train", 40, GPTDatasetConfig(seq_length=12, seed=3, split="1"))
    expected = reference_samples(docs, (0, 30), 12, 40, seed=3)
    for i in range(40):
        np.testing.assert_array_equal(ds.sample_tokens(i), expected[i])


def test_seed_changes_order_not_content(tmp_path):
    prefix, _ = make_dataset(tmp_path / "ds", 50)
    a = build_gpt_dataset(prefix, "train", 100, GPTDatasetConfig(seq_length=16, seed=1, split="1"))
    b = build_gpt_dataset(prefix, "train", 100, GPTDatasetConfig(seq_length=16, seed=2, split="1"))
    assert not np.array_equal(a.shuffle_index, b.shuffle_index)
    assert sum(int(a.sample_tokens(i).sum()) for i in range(100)) != sum(
        int(b.sample_tokens(i).sum()) for i in range(100)
    )


def test_empty_split_with_samples_is_an_error(tmp_path):
    prefix, _ = make_dataset(tmp_path / "ds", 10)
    config = GPTDatasetConfig(seq_length=8, split="969,30,1")  # 10 documents: test split empty
    with pytest.raises(UserError, match="test split empty"):
        build_gpt_dataset(prefix, "test", 5, config)
    assert len(build_gpt_dataset(prefix, "test", 0, config)) == 0


def test_missing_prefix_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        build_gpt_dataset(str(tmp_path / "nope"), "train", 5, GPTDatasetConfig(seq_length=8))


def test_bad_config():
    with pytest.raises(UserError, match="seq_length"):
        GPTDatasetConfig(seq_length=0)
    with pytest.raises(UserError, match="split"):
        GPTDatasetConfig(seq_length=8, split="1,x")


def test_pickle_reopens_without_copying(tmp_path):
    prefix, _ = make_dataset(tmp_path / "ds", 200, max_len=200)
    config = GPTDatasetConfig(seq_length=32, split="1", cache_dir=str(tmp_path / "cache"))
    ds = build_gpt_dataset(prefix, "train", 500, config)
    blob = pickle.dumps(ds)
    assert len(blob) < 4000  # paths only, no index arrays or tokens
    copy = pickle.loads(blob)
    for i in (0, 17, 499):
        np.testing.assert_array_equal(copy[i]["tokens"], ds[i]["tokens"])
    in_memory = build_gpt_dataset(prefix, "train", 50, GPTDatasetConfig(seq_length=32, split="1"))
    np.testing.assert_array_equal(
        pickle.loads(pickle.dumps(in_memory))[3]["labels"], in_memory[3]["labels"]
    )


def test_index_out_of_range(tmp_path):
    prefix, _ = make_dataset(tmp_path / "ds", 20)
    ds = build_gpt_dataset(prefix, "train", 10, GPTDatasetConfig(seq_length=8, split="1"))
    with pytest.raises(IndexError):
        ds[10]
    assert isinstance(ds, GPTDataset)
