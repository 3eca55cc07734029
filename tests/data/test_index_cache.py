"""Index cache: reuse, invalidation, damaged files, and lock waiting across processes."""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from megatron_ext.data.blend import build_datasets
from megatron_ext.data.gpt_dataset import GPTDatasetConfig, build_gpt_dataset
from megatron_ext.data.index_cache import IndexCache
from tests.data.test_gpt_dataset import make_dataset

DESCRIPTION = {"kind": "test", "n": 1000}


def slow_build(marker: str, delay: float = 1.0) -> dict[str, np.ndarray]:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(delay)
    rng = np.random.default_rng(0)
    return {"a": rng.integers(0, 1 << 40, 1000), "b": np.arange(12.0).reshape(3, 4)}


def _cache_worker(cache_dir: str, marker: str, barrier, queue) -> None:
    barrier.wait()
    result = IndexCache(cache_dir, poll_seconds=0.05).load_or_build(
        "t", DESCRIPTION, lambda: slow_build(marker)
    )
    queue.put((result.built, np.asarray(result.arrays["a"]).tobytes(), str(result.path)))


def _blend_worker(data_path: list[str], cache_dir: str, barrier, queue) -> None:
    barrier.wait()
    train, _, _ = build_datasets(data_path, 16, (400, 0, 0), split="1", cache_dir=cache_dir)
    built = [ds.built_index for ds in train.datasets]
    tokens = np.stack([train[i]["tokens"] for i in range(0, 400, 7)])
    queue.put((built, tokens.tobytes()))


def run_processes(target, args, num: int, timeout: float = 60) -> list:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(num), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, queue)) for _ in range(num)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=timeout) for _ in procs]
    for p in procs:
        p.join(timeout)
        assert p.exitcode == 0
    return results


def test_reuse_and_key_changes(tmp_path):
    prefix, _ = make_dataset(tmp_path / "ds", 80)
    cache = str(tmp_path / "cache")
    config = GPTDatasetConfig(seq_length=16, seed=3, split="1", cache_dir=cache)
    first = build_gpt_dataset(prefix, "train", 200, config)
    second = build_gpt_dataset(prefix, "train", 200, config)
    assert first.built_index and not second.built_index and first.cache_path == second.cache_path
    for key in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(first.__dict__[key], second.__dict__[key])
    variants = [
        build_gpt_dataset(prefix, "train", 201, config),
        build_gpt_dataset(
            prefix,
            "train",
            200,
            GPTDatasetConfig(seq_length=17, seed=3, split="1", cache_dir=cache),
        ),
        build_gpt_dataset(
            prefix,
            "train",
            200,
            GPTDatasetConfig(seq_length=16, seed=4, split="1", cache_dir=cache),
        ),
        build_gpt_dataset(
            prefix,
            "train",
            200,
            GPTDatasetConfig(seq_length=16, seed=3, split="9,1", cache_dir=cache),
        ),
    ]
    assert all(v.built_index for v in variants)
    assert len({v.cache_path for v in variants} | {first.cache_path}) == 5
    st = os.stat(prefix + ".bin")  # the dataset touched (or rewritten): a new entry
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = build_gpt_dataset(prefix, "train", 200, config)
    assert touched.built_index and touched.cache_path != first.cache_path


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "stale", "empty-dir"])
def test_damaged_entry_is_rebuilt(tmp_path, damage):
    cache = IndexCache(tmp_path)
    marker = str(tmp_path / "marker")
    good = cache.load_or_build("t", DESCRIPTION, lambda: slow_build(marker, 0))
    path = good.path
    del good
    if damage == "truncate":
        with open(path / "a.npy", "r+b") as f:
            f.truncate(os.path.getsize(path / "a.npy") - 100)
    elif damage == "flip":
        with open(path / "a.npy", "r+b") as f:
            f.seek(-8, os.SEEK_END)
            f.write(b"\xff" * 8)
    elif damage == "manifest":
        (path / "manifest.json").unlink()
    elif damage == "stale":
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["description"]["n"] = 999
        (path / "manifest.json").write_text(json.dumps(manifest))
    else:
        for f in path.iterdir():
            f.unlink()
    assert cache.load("t", DESCRIPTION) is None
    again = cache.load_or_build("t", DESCRIPTION, lambda: slow_build(marker, 0))
    assert again.built and again.path == path
    np.testing.assert_array_equal(again.arrays["a"], slow_build(marker, 0)["a"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp-", ".stale-"))]


def test_lock_timeout(tmp_path):
    cache = IndexCache(tmp_path, poll_seconds=0.05, timeout=0.3)
    (tmp_path / ".locks").mkdir()
    lock_file = tmp_path / ".locks" / f"{cache.entry_path('t', DESCRIPTION).name}.lock"
    with open(lock_file, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("node7 pid 42\n")
        held.flush()
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="node7 pid 42"):
            cache.load_or_build("t", DESCRIPTION, lambda: slow_build(str(tmp_path / "m"), 0))
        assert time.monotonic() - start < 5


@pytest.mark.distributed
def test_concurrent_builders_wait_on_the_lock(tmp_path):
    marker = str(tmp_path / "marker")
    results = run_processes(_cache_worker, (str(tmp_path / "cache"), marker), num=4)
    assert sum(built for built, _, _ in results) == 1
    assert len(open(marker).read().split()) == 1  # the build function ran once
    assert len({blob for _, blob, _ in results}) == 1 and len({p for _, _, p in results}) == 1


@pytest.mark.distributed
def test_concurrent_dataset_builds_agree(tmp_path):
    a, _ = make_dataset(tmp_path / "a", 100, seed=1)
    b, _ = make_dataset(tmp_path / "b", 60, seed=2)
    cache = str(tmp_path / "cache")
    results = run_processes(_blend_worker, (["2", a, "1", b], cache), num=3)
    built = np.array([r[0] for r in results])
    assert (built.sum(axis=0) == 1).all()  # each source's index built by exactly one process
    assert len({r[1] for r in results}) == 1
    train, _, _ = build_datasets(["2", a, "1", b], 16, (400, 0, 0), split="1", cache_dir=cache)
    assert not any(ds.built_index for ds in train.datasets)
