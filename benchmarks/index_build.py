#!/usr/bin/env python3
"""Index build time: megatron-ext's C++ index helpers against megatron-core 0.16.1's helpers_cpp.

    python benchmarks/index_build.py --sizes 1e6 1e7 --blend-samples 1e7          # modest
    python benchmarks/index_build.py --sizes 1e6 1e8 1e9 --blend-samples 1e8 --repeats 1  # full

Input per size N: a synthetic array of N document lengths (int32, log-normal, median ~400
tokens, clipped to 1..100,000; seed 0), no `.bin` needed. Sequence length 2048 (+1), one
epoch. Every stage runs both sides on the same arrays, alternating ours/peer --repeats times;
the figure is the fastest run (wall clock, `time.perf_counter`); the ratio is peer time / our time
(> 1: we are faster).

Stages:
- doc shuffle: permute N document ids (int32). Ours: `shuffle_blocks` (C++ Fisher-Yates,
  counter-based generator). Peer: `numpy.random.RandomState(seed).shuffle`, as megatron-core's
  `_build_document_index` does.
- sample index: `build_sample_index(sizes, doc_index, 2048, S)` against
  `helpers_cpp.build_sample_idx_int32` / `_int64` (the variant megatron-core's wrapper picks),
  same sizes and shuffled doc index; outputs compared value by value.
- sample shuffle: permute the S samples. Ours `shuffle_blocks` (int64); peer RandomState
  shuffle of the uint32/int64 range, as `_build_shuffle_index`.
- full index: everything a split needs from the sizes. Ours `gpt_dataset.build_gpt_indices`;
  peer `_build_document_index` + `helpers.build_sample_idx` + `_build_shuffle_index`
  (megatron-core's own functions, as its GPTDataset calls them).
- blend: `build_blending_index` (11 weights, FinGPT's upsampling factors times synthetic
  token counts) against `helpers_cpp.build_blending_indices`, --blend-samples samples. Each
  side runs in fresh spawned processes (two rounds, alternating; --repeats builds each):
  fastest time, peak memory of the first build (kernel VmHWM after it minus VmRSS before it,
  the mark reset through /proc/self/clear_refs), and the largest |count - weight * t| over
  every prefix t of the stream.
- blend, other weight sets (--blend-weight-sets, default on): the same comparison, time only,
  in this process, for random, equal, two-source and lopsided weights: the cost of both
  loops depends on how predictable the winner of each step is.
- int64 check (--overflow-docs): documents long enough that the stream passes 2^31 tokens;
  our sample index against the NumPy reference and against the peer.

Memory: the script estimates each stage's peak before running it and skips (with a note) any
stage that would not fit in --max-gb (default: 85% of MemAvailable).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SEQ_LENGTH = 2048
FINGPT_UPSAMPLE = [1.5, 1, 1, 3, 3, 2, 2, 1, 1, 1, 1]  # Parsebank .. Reddit-Fi
GB = 1e9


def peer():
    """megatron-core's helpers (imported lazily: it pulls in torch and prints warnings)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import gpt_dataset, helpers, helpers_cpp
    return helpers_cpp, helpers, gpt_dataset


def ours():
    from megatron_ext.data import gpt_dataset, index_helpers

    if not index_helpers.has_cpp():
        sys.exit(
            "megatron_ext._index_cpp is not built: MAX_JOBS=1 python setup.py build_ext --inplace"
        )
    return index_helpers, gpt_dataset


def synthetic_sizes(n: int, seed: int = 0, chunk: int = 1 << 24) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sizes = np.empty(n, np.int32)
    for lo in range(0, n, chunk):
        part = rng.lognormal(6.0, 1.0, min(chunk, n - lo))
        sizes[lo : lo + part.size] = np.clip(part, 1, 100_000)
    return sizes


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    return 0.0


def timed(fn, repeats: int, keep: bool = False):
    """(fastest seconds, last result if keep) of `repeats` calls; results are freed between."""
    best, result = float("inf"), None
    for _ in range(repeats):
        result = None
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
        if not keep:
            result = None
    return best, result


MEAN_DOC_TOKENS = 665  # of the synthetic sizes (log-normal 6, 1): e^6.5


def compare(ours_fn, peer_fn, repeats: int) -> tuple[float, float]:
    """Fastest of `repeats` runs of each side, alternating ours/peer so load drifts hit both."""
    t_ours = t_peer = float("inf")
    for _ in range(repeats):
        t_ours = min(t_ours, timed(ours_fn, 1)[0])
        t_peer = min(t_peer, timed(peer_fn, 1)[0])
    return t_ours, t_peer


def estimates(n: int, s: int) -> dict[str, float]:
    """Peak bytes of each stage, inputs included (N documents, S samples)."""
    peer_row = 8 if n <= np.iinfo(np.int32).max else 16  # the peer's int32 or int64 path
    return {
        # sizes + doc index (4 N each); both sample indices side by side (ours int64)
        "sample index": 8 * n + 16 * s + peer_row * s,
        # from here the shuffled doc index is freed: sizes only
        "sample shuffle": 4 * n + 8 * s,
        "full index (ours)": 4 * n + 4 * n + 16 * s + 8 * s,
        # _build_document_index makes an int64 mgrid (16 N) and an int32 copy (4 N)
        "full index (peer)": 4 * n + 20 * n + 16 * s + 8 * s,
    }


def bench_size(n: int, repeats: int, max_bytes: float, seed: int) -> list[dict]:
    H, G = ours()
    helpers_cpp, helpers, mgpt = peer()
    rows: list[dict] = []
    guess = estimates(n, n * MEAN_DOC_TOKENS // SEQ_LENGTH)
    print(f"\nN = {n:.0e}: estimated peak {max(guess.values()) / GB:.1f} GB", flush=True)
    if min(guess.values()) > max_bytes:
        print(f"  skipped: not even the smallest stage fits in {max_bytes / GB:.1f} GB", flush=True)
        return [{"N": n, "stage": "all", "skipped": "does not fit"}]
    start = time.perf_counter()
    sizes = synthetic_sizes(n, seed)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // SEQ_LENGTH
    est = estimates(n, num_samples)
    print(
        f"  {tokens:,} tokens, {num_samples:,} samples of {SEQ_LENGTH}+1 "
        f"(sizes made in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )

    def fits(stage: str) -> bool:
        if est[stage] > max_bytes:
            note = f"needs ~{est[stage] / GB:.1f} GB > {max_bytes / GB:.1f} GB"
            rows.append({"N": n, "stage": stage, "skipped": note})
            print(f"  {stage}: skipped, {note}", flush=True)
            return False
        return True

    def record(stage: str, t_ours: float, t_peer: float | None, note: str = "") -> None:
        row = {"N": n, "stage": stage, "ours_s": t_ours, "peer_s": t_peer, "note": note}
        row["ratio"] = None if t_peer is None else t_peer / t_ours
        rows.append(row)
        ratio = "" if t_peer is None else f"  peer {t_peer:.4f} s  ratio {t_peer / t_ours:.2f}x"
        print(f"  {stage:<16} ours {t_ours:.4f} s{ratio}  {note}", flush=True)

    # doc shuffle, in place on a ready range (repeats shuffle again: same cost); ours stays
    # shuffled and is the input of the sample-index stage
    doc_index = np.arange(n, dtype=np.int32)
    peer_doc = np.arange(n, dtype=np.int32)
    t_ours, t_peer = compare(
        lambda: H.shuffle_blocks(doc_index, [0, n], seed),
        lambda: np.random.RandomState(seed).shuffle(peer_doc),
        repeats,
    )
    peer_doc = None  # free it
    record("doc shuffle", t_ours, t_peer)

    if fits("sample index"):
        use64 = max(doc_index.shape[0], int(sizes.max())) > np.iinfo(np.int32).max
        fn = helpers_cpp.build_sample_idx_int64 if use64 else helpers_cpp.build_sample_idx_int32
        t_ours, t_peer = compare(
            lambda: H.build_sample_index(sizes, doc_index, SEQ_LENGTH, num_samples),
            lambda: fn(sizes, doc_index, SEQ_LENGTH, 1, tokens, True, 1),
            repeats,
        )
        mine = H.build_sample_index(sizes, doc_index, SEQ_LENGTH, num_samples)
        theirs = fn(sizes, doc_index, SEQ_LENGTH, 1, tokens, True, 1)
        same = theirs.shape == mine.shape and bool(np.array_equal(theirs, mine))
        note = f"peer {'int64' if use64 else 'int32'} path; outputs equal: {same}"
        mine = theirs = None
        record("sample index", t_ours, t_peer, note)
    doc_index = None

    if fits("sample shuffle"):
        t_ours, t_peer = compare(
            lambda: H.shuffle_blocks(
                np.arange(num_samples, dtype=np.int64), [0, num_samples], seed
            ),
            lambda: mgpt._build_shuffle_index(
                num_samples, num_samples, np.random.RandomState(seed)
            ),
            repeats,
        )
        record("sample shuffle", t_ours, t_peer, "both include making the range")

    def ours_full():
        return G.build_gpt_indices(sizes, (0, n), SEQ_LENGTH, num_samples, seed)

    def peer_full():
        state = np.random.RandomState(seed)
        docs = mgpt._build_document_index(np.arange(n, dtype=np.int32), 1, state, False)
        sample = helpers.build_sample_idx(sizes, docs, SEQ_LENGTH, 1, tokens, True, True)
        return mgpt._build_shuffle_index(sample.shape[0] - 1, sample.shape[0] - 1, state)

    if fits("full index (ours)"):
        if fits("full index (peer)"):
            t_ours, t_peer = compare(ours_full, peer_full, repeats)
        else:
            t_ours, t_peer = timed(ours_full, repeats)[0], None
        record("full index", t_ours, t_peer, "doc shuffle + sample index + sample shuffle")
    return rows


def blend_weights(seed: int = 0) -> np.ndarray:
    tokens = np.random.default_rng(seed).lognormal(21.0, 1.5, len(FINGPT_UPSAMPLE))
    weights = tokens * np.array(FINGPT_UPSAMPLE)
    return weights / weights.sum()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns the baseline.

    (ru_maxrss is useless here: a spawned child inherits its parent's maximum across exec.)
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return _status_bytes("VmHWM")


def _blend_child(side: str, num_samples: int, repeats: int, queue) -> None:
    """One side in a fresh process: peak memory of the first build, fastest of `repeats`."""
    weights = blend_weights()
    if side == "ours":
        H, _ = ours()
        build = lambda: H.build_blending_index(weights, num_samples)[0]  # noqa: E731
    else:
        helpers_cpp, _, _ = peer()

        def build():  # megatron-core's BlendedDataset allocates these right before the call
            source = np.zeros(num_samples, np.int16)
            sample = np.zeros(num_samples, np.int64)
            helpers_cpp.build_blending_indices(
                source, sample, weights, weights.size, num_samples, False
            )
            return source

    before = _reset_peak_rss()
    start = time.perf_counter()
    source = build()
    seconds = [time.perf_counter() - start]
    peak = _status_bytes("VmHWM") - before
    for _ in range(repeats - 1):
        start = time.perf_counter()
        build()
        seconds.append(time.perf_counter() - start)
    deviation = 0.0
    t = np.arange(1, num_samples + 1, dtype=np.float64)
    for d in range(weights.size):
        counts = np.cumsum(source == d, dtype=np.int64)
        deviation = max(deviation, float(np.abs(counts - weights[d] * t).max()))
        del counts
    queue.put({"seconds": min(seconds), "peak_bytes": peak, "max_deviation": deviation})


def bench_blend(num_samples: int, repeats: int, max_bytes: float) -> list[dict]:
    need = num_samples * (2 + 8) + num_samples * 8 * 3  # outputs + the deviation check
    print(
        f"\nblend: 11 sources, {num_samples:.0e} samples (estimated peak {need / GB:.1f} GB)",
        flush=True,
    )
    if need > max_bytes:
        print("  skipped", flush=True)
        return [{"stage": "blend", "N": num_samples, "skipped": f"needs ~{need / GB:.1f} GB"}]
    ctx = mp.get_context("spawn")
    results: dict[str, dict] = {}
    for _ in range(2):  # two rounds, ours/peer alternating, each child `repeats` builds
        for side in ("ours", "peer"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_blend_child, args=(side, num_samples, repeats, queue))
            proc.start()
            res = queue.get()
            proc.join()
            if side not in results or res["seconds"] < results[side]["seconds"]:
                results[side] = res
    for side, best in results.items():
        print(
            f"  {side:<5} {best['seconds']:.3f} s  peak +{best['peak_bytes'] / 1e6:.0f} MB  "
            f"max |count - w t| = {best['max_deviation']:.3f}",
            flush=True,
        )
    ratio = results["peer"]["seconds"] / results["ours"]["seconds"]
    print(f"  ratio {ratio:.2f}x", flush=True)
    flat = {f"{k}_{side}": v for side, res in results.items() for k, v in res.items()}
    return [{"stage": "blend", "N": num_samples, **flat, "ratio": ratio}]


def weight_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {
        "fingpt-11": blend_weights(),
        "random-11": rng.random(11),
        "equal-11": np.ones(11),
        "0.3/0.7": np.array([0.3, 0.7]),
        "100:1:1:1:1": np.array([100.0, 1, 1, 1, 1]),
    }


def bench_blend_weights(num_samples: int, repeats: int) -> list[dict]:
    """Blending time for other weight sets, in this process (time only)."""
    H, _ = ours()
    helpers_cpp, _, _ = peer()
    print(f"\nblend, other weight sets, {num_samples:.0e} samples:", flush=True)
    rows = []
    for name, weights in weight_sets().items():
        w = weights / weights.sum()

        def peer_build(w=w):
            source = np.zeros(num_samples, np.int16)
            sample = np.zeros(num_samples, np.int64)
            helpers_cpp.build_blending_indices(source, sample, w, w.size, num_samples, False)

        t_ours, t_peer = compare(
            lambda w=w: H.build_blending_index(w, num_samples), peer_build, repeats
        )
        rows.append({"stage": "blend weights", "weights": name, "ours_s": t_ours, "peer_s": t_peer})
        print(
            f"  {name:<12} ours {t_ours:.3f} s  peer {t_peer:.3f} s  ratio {t_peer / t_ours:.2f}x"
        )
    return rows


def check_overflow(num_docs: int) -> dict:
    """Documents of ~3,000 tokens each: the stream passes 2^31 tokens at num_docs >= 1e6."""
    H, _ = ours()
    helpers_cpp, helpers, _ = peer()
    rng = np.random.default_rng(1)
    sizes = rng.integers(1000, 5000, num_docs).astype(np.int32)
    doc_index = H.permutation(num_docs, seed=2, dtype=np.int32)
    tokens = int(sizes.sum(dtype=np.int64))
    num_samples = (tokens - 1) // SEQ_LENGTH
    mine = H.build_sample_index(sizes, doc_index, SEQ_LENGTH, num_samples)
    ref = H.build_sample_index_reference(sizes, doc_index, SEQ_LENGTH, num_samples)
    starts = np.cumsum(sizes[doc_index], dtype=np.int64) - sizes[doc_index]
    positions_ok = bool(
        np.array_equal(starts[mine[:, 0]] + mine[:, 1], np.arange(num_samples + 1) * SEQ_LENGTH)
    )
    theirs = helpers.build_sample_idx(sizes, doc_index, SEQ_LENGTH, 1, tokens, True, True)
    result = {
        "documents": num_docs,
        "tokens": tokens,
        "past_2_31": tokens > 2**31,
        "ours_equals_reference": bool(np.array_equal(mine, ref)),
        "ours_positions_exact": positions_ok,
        "peer_dtype": str(theirs.dtype),
        "peer_equals_ours": theirs.shape == mine.shape and bool(np.array_equal(theirs, mine)),
    }
    print(f"\nint64 check: {json.dumps(result)}", flush=True)
    return result


def markdown(rows: list[dict]) -> str:
    out = [
        "| N docs | stage | ours (s) | megatron-core (s) | peer / ours | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("stage") == "blend" or "skipped" in r:
            continue
        peer_s = "n/a" if r["peer_s"] is None else f"{r['peer_s']:.4f}"
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        out.append(
            f"| {r['N']:.0e} | {r['stage']} | {r['ours_s']:.4f} | {peer_s} | {ratio} "
            f"| {r['note']} |"
        )
    out += [
        f"| {r['N']:.0e} | {r['stage']} | skipped: {r['skipped']} | | | |"
        for r in rows
        if "skipped" in r
    ]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes", nargs="*", default=["1e6", "1e7"], help="document counts (1e6 1e8 1e9)"
    )
    p.add_argument(
        "--blend-samples", default="1e7", help="samples of the 11-source blend (0: skip)"
    )
    p.add_argument("--overflow-docs", default="1e6", help="documents of the int64 check (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="fastest of N runs per stage and side")
    p.add_argument(
        "--max-gb", type=float, default=None, help="memory budget (default 85%% of MemAvailable)"
    )
    p.add_argument(
        "--blend-weight-sets",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the blend with other weight sets (in this process, time only)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write every figure to this JSON file")
    args = p.parse_args()
    max_bytes = (args.max_gb if args.max_gb else 0.85 * mem_available_gb()) * GB
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"budget {max_bytes / GB:.1f} GB; python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )
    rows: list[dict] = []
    for size in args.sizes:
        rows += bench_size(int(float(size)), args.repeats, max_bytes, args.seed)
        gc.collect()
    blend = []
    if float(args.blend_samples):
        blend = bench_blend(int(float(args.blend_samples)), args.repeats, max_bytes)
        if args.blend_weight_sets:
            blend += bench_blend_weights(int(float(args.blend_samples)), args.repeats)
    overflow = check_overflow(int(float(args.overflow_docs))) if float(args.overflow_docs) else None
    print("\n" + markdown(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "blend": blend, "overflow": overflow}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
