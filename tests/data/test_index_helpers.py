"""C++ index helpers against their NumPy references, megatron-core, and their guarantees."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest

from megatron_ext.data import index_helpers as H

pytestmark = pytest.mark.skipif(not H.has_cpp(), reason="megatron_ext._index_cpp is not built")


def shuffled_doc_index(num_docs: int, epochs: int, dtype, seed: int) -> np.ndarray:
    doc_index = np.tile(np.arange(num_docs, dtype=dtype), epochs)
    H.shuffle_blocks(doc_index, np.arange(epochs + 1) * num_docs, seed)
    return doc_index


@pytest.mark.parametrize("size_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("doc_dtype", [np.int32, np.int64])
def test_sample_index_matches_reference(size_dtype, doc_dtype):
    rng = np.random.default_rng(0)
    for trial in range(30):
        num_docs = int(rng.integers(1, 300))
        sizes = rng.integers(0, 60, num_docs).astype(size_dtype)
        sizes[0] = max(int(sizes[0]), 1)
        epochs = int(rng.integers(1, 4))
        doc_index = shuffled_doc_index(num_docs, epochs, doc_dtype, trial)
        seq_length = int(rng.integers(1, 40))
        total = H.max_samples(int(sizes.sum()) * epochs, seq_length)
        ours = H.build_sample_index(sizes, doc_index, seq_length, total)
        ref = H.build_sample_index_reference(sizes, doc_index, seq_length, total)
        assert ours.dtype == np.int64 and ours.shape == (total + 1, 2)
        np.testing.assert_array_equal(ours, ref)
        # fewer samples than available: a prefix of the same rows
        np.testing.assert_array_equal(
            H.build_sample_index(sizes, doc_index, seq_length, total // 2), ours[: total // 2 + 1]
        )


def test_sample_index_matches_megatron_core():
    helpers = pytest.importorskip("megatron.core.datasets.helpers")
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 500, 5000).astype(np.int32)
    doc_index = shuffled_doc_index(sizes.size, 2, np.int32, 7)
    seq_length, tokens = 128, int(sizes.sum())
    theirs = helpers.build_sample_idx(sizes, doc_index, seq_length, 2, tokens, True, True)
    ours = H.build_sample_index(sizes, doc_index, seq_length, theirs.shape[0] - 1)
    np.testing.assert_array_equal(ours, theirs.astype(np.int64))


def test_sample_index_past_2_31_tokens():
    # Synthetic sizes only: ~4.3e9 and ~3e9 tokens; stream positions far beyond int32.
    for sizes in (
        np.full(2, 2**31 - 1, np.int32),
        np.random.default_rng(2).integers(500_000, 1_500_000, 3000).astype(np.int32),
    ):
        doc_index = shuffled_doc_index(sizes.size, 1, np.int32, 3)
        seq_length = 1 << 17
        total = H.max_samples(int(sizes.sum(dtype=np.int64)), seq_length)
        assert total * seq_length > 2**31
        ours = H.build_sample_index(sizes, doc_index, seq_length, total)
        np.testing.assert_array_equal(
            ours, H.build_sample_index_reference(sizes, doc_index, seq_length, total)
        )
        ends = np.cumsum(sizes[doc_index], dtype=np.int64)
        starts = ends - sizes[doc_index]
        positions = starts[ours[:, 0]] + ours[:, 1]
        np.testing.assert_array_equal(positions, np.arange(total + 1, dtype=np.int64) * seq_length)
        assert (ours[:, 1] < sizes[doc_index[ours[:, 0]]]).all()


def test_sample_index_errors():
    sizes = np.array([5, 5], np.int32)
    with pytest.raises(ValueError, match="too few tokens"):
        H.build_sample_index(sizes, np.array([0, 1], np.int32), 4, 3)
    with pytest.raises(ValueError, match="not a document id"):
        H.build_sample_index(sizes, np.array([0, 2], np.int32), 4, 2)


def test_blending_matches_reference_and_stays_within_one_sample():
    rng = np.random.default_rng(3)
    fingpt = [1.5, 1, 1, 3, 3, 2, 2, 1, 1, 1, 1]
    cases = [fingpt, [1.0], [0.0, 1.0, 0.0], [1e-4, 1.0], [0.5, 0.5]]
    cases += [list(rng.random(int(rng.integers(2, 12))) ** 3) for _ in range(20)]
    cases += [list(rng.random(40)), [1.0] * 33]  # past the unrolled sizes (<= 32 sources)
    for weights in cases:
        n = 3000
        source, sample, counts = H.build_blending_index(weights, n)
        for ours, ref in zip(
            (source, sample, counts), H.build_blending_index_reference(weights, n), strict=True
        ):
            np.testing.assert_array_equal(ours, ref)
        assert source.dtype == np.int16 and sample.dtype == np.int64
        w = np.asarray(weights) / np.sum(weights)
        onehot = np.zeros((n, w.size), np.int64)
        onehot[np.arange(n), source] = 1
        realised = np.cumsum(onehot, axis=0)
        deviation = np.abs(realised - np.outer(np.arange(1, n + 1), w))
        assert deviation.max() < 1.0, (weights, deviation.max())
        np.testing.assert_array_equal(counts, realised[-1])
        for d in range(w.size):  # running sample numbers within each source
            np.testing.assert_array_equal(sample[source == d], np.arange(counts[d]))
        assert (counts[w == 0] == 0).all()


@pytest.mark.parametrize("bad", [[], [-1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0], [float("inf")]])
def test_blending_rejects_bad_weights(bad):
    with pytest.raises(ValueError):
        H.build_blending_index(bad, 10)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_shuffle_blocks_matches_reference(dtype):
    rng = np.random.default_rng(4)
    for seed in range(10):
        n = int(rng.integers(0, 500))
        bounds = np.concatenate([[0], np.sort(rng.integers(0, n + 1, 3)), [n]])
        ours = H.shuffle_blocks(np.arange(n, dtype=dtype), bounds, seed)
        ref = H.shuffle_blocks_reference(np.arange(n, dtype=dtype), bounds, seed)
        np.testing.assert_array_equal(ours, ref)
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # each block permuted in place
            np.testing.assert_array_equal(np.sort(ours[lo:hi]), np.arange(lo, hi))


def test_shuffle_depends_on_seed_and_block_only():
    a = H.permutation(1000, seed=5)
    np.testing.assert_array_equal(a, H.permutation(1000, seed=5))
    assert not np.array_equal(a, H.permutation(1000, seed=6))
    assert not np.array_equal(a, np.arange(1000))
    two = H.shuffle_blocks(np.arange(2000), [0, 1000, 2000], 5)
    np.testing.assert_array_equal(two[:1000], a)  # block 0 as a one-block shuffle
    assert not np.array_equal(two[1000:] - 1000, a)  # block 1 has its own stream
    assert H.derive_seed(1, 2) != H.derive_seed(1, 3) != H.derive_seed(2, 2)


def test_shuffle_refuses_copies():
    with pytest.raises(ValueError):
        H.shuffle_blocks(np.arange(10, dtype=np.float64), [0, 10], 1)
    with pytest.raises(ValueError):
        H.shuffle_blocks(np.arange(20)[::2], [0, 10], 1)
    with pytest.raises(ValueError):
        H.shuffle_blocks(np.arange(10), [0, 11], 1)


def test_fallback_without_extension_warns_once(monkeypatch):
    import megatron_ext

    monkeypatch.setitem(sys.modules, "megatron_ext._index_cpp", None)  # import now fails
    monkeypatch.delattr(megatron_ext, "_index_cpp", raising=False)
    monkeypatch.setattr(H, "_cpp_module", None)
    monkeypatch.setattr(H, "_warned", False)
    sizes = np.array([3, 9, 4, 7], np.int32)
    doc_index = np.array([2, 0, 3, 1], np.int32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = H.build_sample_index(sizes, doc_index, 5, 4)
        perm = H.permutation(50, seed=1)
        blend = H.build_blending_index([1, 2], 30)
    assert sum("not built" in str(w.message) for w in caught) == 1
    monkeypatch.undo()
    np.testing.assert_array_equal(rows, H.build_sample_index(sizes, doc_index, 5, 4))
    np.testing.assert_array_equal(perm, H.permutation(50, seed=1))
    np.testing.assert_array_equal(blend[0], H.build_blending_index([1, 2], 30)[0])
