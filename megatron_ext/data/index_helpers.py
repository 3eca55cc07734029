"""Typed wrappers over the C++ index helpers (`megatron_ext._index_cpp`) and their NumPy references.

Three primitives build every index of the GPT and blended datasets:

- `build_sample_index(sizes, doc_index, seq_length, num_samples)` -> int64 `[num_samples + 1, 2]`:
  row k is (position in `doc_index`, token offset in that document) of stream position
  `k * seq_length`; sample k is the `seq_length + 1` tokens from row k to row k + 1 inclusive.
- `build_blending_index(weights, num_samples)` -> (int16 source `[n]`, int64 sample-in-source
  `[n]`, int64 counts `[num_sources]`): Tijdeman's algorithm, so every source's realised count
  after any prefix t is within 1 of `weight * t`.
- `shuffle_blocks(values, bounds, seed)`: in-place Fisher-Yates of each block
  `values[bounds[b]:bounds[b+1]]` with a counter-based generator (platform independent).

The references give identical output (the tests compare them) and serve as the fallback when
the extension is not built, with one warning. The fallback for the blending index and the
shuffle loops in Python: correct but slow past ~1e7 elements.
"""

from __future__ import annotations

import warnings

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_BLOCK_MUL = np.uint64(0xD1B54A32D192ED03)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_UINT64 = (1 << 64) - 1

_cpp_module = None
_warned = False


def _cpp():
    """The compiled module, or None (warning once) when it was not built."""
    global _cpp_module, _warned
    if _cpp_module is None and not _warned:
        try:
            from megatron_ext import _index_cpp

            _cpp_module = _index_cpp
        except ImportError as exc:
            _warned = True
            warnings.warn(
                f"megatron_ext._index_cpp is not built ({exc}); using the NumPy reference index "
                "helpers (slow for large corpora). Build it with "
                "`MAX_JOBS=1 python setup.py build_ext --inplace`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _cpp_module


def has_cpp() -> bool:
    return _cpp() is not None


# ---------------------------------------------------------------------------------------------
# Sample index
# ---------------------------------------------------------------------------------------------


def _int_array(arr: np.ndarray) -> np.ndarray:
    """int32/int64 stay as they are (no copy of a memory map); other dtypes become int64."""
    arr = np.asarray(arr)
    if arr.dtype not in (np.int32, np.int64):
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def max_samples(num_tokens: int, seq_length: int) -> int:
    """Whole samples of `seq_length + 1` tokens (sharing one token) in a stream of `num_tokens`."""
    return max(0, (int(num_tokens) - 1) // int(seq_length))


def build_sample_index(
    sizes: np.ndarray,
    doc_index: np.ndarray,
    seq_length: int,
    num_samples: int,
    use_cpp: bool = True,
) -> np.ndarray:
    """Sample index over the documents `doc_index` (ids into `sizes`, tokens per document).

    sizes: int32 or int64 `[num_documents]`; doc_index: int32 or int64 `[num_positions]`.
    Returns int64 `[num_samples + 1, 2]`. Raises ValueError if the documents hold fewer than
    `num_samples * seq_length + 1` tokens.
    """
    sizes = _int_array(sizes)
    doc_index = _int_array(doc_index)
    cpp = _cpp() if use_cpp else None
    if cpp is not None:
        try:
            return cpp.build_sample_index(sizes, doc_index, int(seq_length), int(num_samples))
        except (IndexError, ValueError) as exc:  # std::out_of_range / invalid_argument
            raise ValueError(str(exc)) from None
    return build_sample_index_reference(sizes, doc_index, seq_length, num_samples)


def build_sample_index_reference(
    sizes: np.ndarray, doc_index: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """Vectorised NumPy version of `build_sample_index` (same output)."""
    if seq_length < 1 or num_samples < 0:
        raise ValueError("seq_length must be at least 1 and num_samples non-negative")
    doc_index = np.asarray(doc_index)
    if doc_index.size and (doc_index.min() < 0 or doc_index.max() >= len(sizes)):
        raise ValueError(f"doc_index holds ids outside 0..{len(sizes) - 1}")
    ends = np.cumsum(np.asarray(sizes)[doc_index], dtype=np.int64)  # stream end of each position
    starts = np.arange(num_samples + 1, dtype=np.int64) * np.int64(seq_length)
    if ends.size == 0 or starts[-1] >= ends[-1]:
        raise ValueError(
            f"the documents hold too few tokens for {num_samples} samples of "
            f"{seq_length} + 1 tokens"
        )
    pos = np.searchsorted(ends, starts, side="right")  # first document ending after the start
    doc_start = ends[pos] - np.asarray(sizes)[doc_index[pos]].astype(np.int64)
    return np.stack([pos.astype(np.int64), starts - doc_start], axis=1)


# ---------------------------------------------------------------------------------------------
# Blending index
# ---------------------------------------------------------------------------------------------


def _check_weights(weights) -> np.ndarray:
    w = np.ascontiguousarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or w.size > np.iinfo(np.int16).max:
        raise ValueError("weights must be a 1-D list of 1..32767 values")
    if not np.all(np.isfinite(w)) or (w < 0).any():
        raise ValueError(f"weights must be finite and non-negative (got {w.tolist()})")
    if not (w > 0).any():
        raise ValueError("at least one weight must be positive")
    return w


def build_blending_index(
    weights, num_samples: int, use_cpp: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which source, and which sample of it, each of `num_samples` global samples comes from.

    weights: `[num_sources]`, non-negative, normalised here. Returns (int16 `[n]` source,
    int64 `[n]` running sample number within the source, int64 `[num_sources]` counts).
    """
    w = _check_weights(weights)
    cpp = _cpp() if use_cpp else None
    if cpp is not None:
        return tuple(cpp.build_blending_index(w, int(num_samples)))
    return build_blending_index_reference(w, num_samples)


def build_blending_index_reference(
    weights, num_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Python loop over the same float64 expressions as the C++ (same output; slow).

    Sample t goes to the source minimising (not released, deadline, index), where source i
    is released when (c_i + s) / w_i <= t and its deadline is (c_i + 1 - s) / w_i.
    """
    w = _check_weights(weights)
    total = 0.0
    for x in w.tolist():
        total += x
    ids = [i for i, x in enumerate(w.tolist()) if x > 0]
    s = 1.0 / float(2 * max(len(ids), 2) - 2)
    one_minus_s = 1.0 - s
    inv = [1.0 / (float(w[i]) / total) for i in ids]
    release = [s * v for v in inv]
    deadline = [one_minus_s * v for v in inv]
    count = [0] * len(ids)
    source = np.empty(num_samples, np.int16)
    sample = np.empty(num_samples, np.int64)
    for n in range(num_samples):
        t = float(n + 1)
        j = min(range(len(ids)), key=lambda j: (release[j] > t, deadline[j], ids[j]))
        source[n] = ids[j]
        sample[n] = count[j]
        count[j] += 1
        c = float(count[j])
        release[j] = (c + s) * inv[j]
        deadline[j] = (c + one_minus_s) * inv[j]
    counts = np.zeros(w.size, np.int64)
    counts[ids] = count
    return source, sample, counts


# ---------------------------------------------------------------------------------------------
# Shuffle
# ---------------------------------------------------------------------------------------------


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic, as in C++)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _block_key(seed: int, block: int) -> np.uint64:
    x = np.array([(int(seed) & _UINT64) ^ ((int(block) * int(_BLOCK_MUL)) & _UINT64)], np.uint64)
    return _mix64(x)[0]


def shuffle_draws(seed: int, block: int, n: int) -> np.ndarray:
    """The swap partner of every Fisher-Yates step i in 0..n-1 of block `block` (entry 0 unused)."""
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        r = _mix64(_block_key(seed, block) + i * _GOLDEN)
    return (r % (i + np.uint64(1))).astype(np.int64)


def _check_bounds(bounds, size: int) -> np.ndarray:
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    if bounds.ndim != 1 or bounds.size < 1:
        raise ValueError("bounds must be a 1-D array of at least one entry")
    if bounds[0] < 0 or bounds[-1] > size or (np.diff(bounds) < 0).any():
        raise ValueError(f"bounds must be ascending within 0..{size}")
    return bounds


def shuffle_blocks(values: np.ndarray, bounds, seed: int, use_cpp: bool = True) -> np.ndarray:
    """Shuffle each block `values[bounds[b]:bounds[b+1]]` in place; returns `values`.

    values: contiguous, writeable int32 or int64 `[n]`. The permutation depends only on the
    seed, the block number and the block length.
    """
    if values.dtype not in (np.int32, np.int64) or not values.flags.c_contiguous:
        raise ValueError("values must be a contiguous int32 or int64 array")
    bounds = _check_bounds(bounds, values.size)
    seed = int(seed) & _UINT64
    cpp = _cpp() if use_cpp else None
    if cpp is not None:
        cpp.shuffle_blocks(values, bounds, seed)
        return values
    return shuffle_blocks_reference(values, bounds, seed)


def shuffle_blocks_reference(values: np.ndarray, bounds, seed: int) -> np.ndarray:
    """NumPy draws + a Python swap loop (same output as the C++; slow past ~1e7 elements)."""
    bounds = _check_bounds(bounds, values.size)
    for b in range(bounds.size - 1):
        lo, hi = int(bounds[b]), int(bounds[b + 1])
        block = values[lo:hi].tolist()
        draws = shuffle_draws(seed, b, hi - lo).tolist()
        for i in range(hi - lo - 1, 0, -1):
            j = draws[i]
            block[i], block[j] = block[j], block[i]
        values[lo:hi] = block
    return values


def permutation(n: int, seed: int, dtype=np.int64, use_cpp: bool = True) -> np.ndarray:
    """A seeded permutation of `arange(n)` (one block)."""
    values = np.arange(n, dtype=dtype)
    return shuffle_blocks(values, [0, n], seed, use_cpp=use_cpp)


def derive_seed(seed: int, *salt: int) -> int:
    """A 64-bit seed for one use of a user seed (document shuffle, sample shuffle, ...)."""
    key = int(seed) & _UINT64
    for s in salt:
        key = int(_mix64(np.array([key ^ (int(s) & _UINT64)], np.uint64))[0])
    return key
