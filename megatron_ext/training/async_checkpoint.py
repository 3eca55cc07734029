"""Asynchronous checkpoint saves (`checkpoint.async_save: true`).

A save stalls training only while each rank copies its part of the state to host memory (its
snapshot); a writer thread per rank writes the files from the snapshot while training goes on.
When a rank's files are written it puts a part marker in the tag's `.parts/` directory (its
files' sizes and checksums). Rank 0's finaliser thread waits for every rank's marker, checks
each file's size on disk against its marker, writes the manifest, renames the `.tmp` directory
and only then moves `latest` (training/checkpointing.py). A kill at any moment before that leaves
the previous checkpoint as `latest`, complete; the `.tmp` directory is removed by the next save of
that tag.

The next save, the end of the run and a stop (signal, time limit, kill switch) wait for the
write in flight first (`checkpointing.finish_saves`), so a run exits 0 only with its last
checkpoint complete.

Why our own writer: DeepSpeed 0.19's DecoupledCheckpointEngine hands the live state (no
snapshot) to a writer process and commits it from `engine.step()`, which the pipeline engine
never calls (PipelineEngine._exec_optimizer_step calls _take_model_step directly): `latest`
would never move; its FastCheckpointEngine needs the async_io op (libaio). torch's
asynchronous distributed checkpointing writes its own format (.distcp), not the per-layer files
that the universal conversion and every converter here read. Here: the snapshot (into host
buffers reused from save to save, pinned for GPU tensors), the files and the checksums are the
synchronous save's; only the timing differs.

Memory: the snapshot holds one more copy of the rank's checkpoint part in host memory (~14 bytes
per parameter of the stage / dp for ZeRO-1 state, plus the weights) while it is written.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import threading
import time
from pathlib import Path

import torch

from megatron_ext.log import get_logger

log = get_logger(__name__)

PARTS = ".parts"  # under <tag>.tmp: rank{R:05d}.json when rank R's files are written
POLL_S = 0.5
HURRY_POLL_S = 0.005
WRITER_NICE = 19


class HostBuffers:
    """Host copies of tensors, reused from one save to the next (same file name, same place in
    the state, same shape and dtype): no allocation (and for pinned memory, no cudaHostAlloc)
    after the first save."""

    def __init__(self):
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}

    def copy(self, tensor: torch.Tensor, key: tuple[str, int]) -> torch.Tensor:
        t = tensor.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda"
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=t.device.type == "cuda")
        return buf

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def snapshot(obj, buffers: HostBuffers, name: str):
    """A copy of OBJ (a state dict: dicts, lists, tuples, sets of tensors and plain values) whose
    tensors live in host memory and no longer change with training. NAME keys the buffers."""
    counter = [0]

    def walk(x):
        if isinstance(x, torch.Tensor):
            counter[0] += 1
            return buffers.copy(x, (name, counter[0]))
        if isinstance(x, str | int | float | bool | bytes | type(None) | torch.dtype | torch.Size):
            return x
        if isinstance(x, dict):
            out = copy.copy(x)  # the same type (OrderedDict, defaultdict with its factory)
            for k, v in x.items():
                out[k] = walk(v)
            return out
        if isinstance(x, list):
            return type(x)(walk(v) for v in x) if type(x) is not list else [walk(v) for v in x]
        if isinstance(x, tuple):
            items = [walk(v) for v in x]
            if hasattr(x, "_fields"):  # a named tuple
                return type(x)(*items)
            return tuple(items) if type(x) is tuple else type(x)(items)
        try:
            return copy.deepcopy(x)
        except Exception:  # noqa: BLE001 - an object that cannot be copied is written as is
            return x

    out = walk(obj)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking device-to-host copies are done
    return out


def part_marker(tmp_dir: Path, rank: int) -> Path:
    return Path(tmp_dir) / PARTS / f"rank{rank:05d}.json"


def failed_marker(tmp_dir: Path, rank: int) -> Path:
    return Path(tmp_dir) / PARTS / f"rank{rank:05d}.failed"


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class BackgroundWriter:
    """One thread of one rank writing snapshots in order. `submit` (from DeepSpeed's save, via
    the checkpoint engine) snapshots and queues a file; `close_part` queues this rank's part
    marker for a tag directory; `wait` blocks until everything queued is written and raises the
    first error the thread met (the files of a failed part get no marker)."""

    def __init__(self, files, rank: int):
        self.files, self.rank = files, rank  # the checkpoint engine: files.write does the write
        self.buffers = HostBuffers()
        self.snapshot_s = 0.0
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state_dict, path: str) -> None:
        started = time.perf_counter()
        state = snapshot(state_dict, self.buffers, os.path.basename(path))
        self.snapshot_s += time.perf_counter() - started
        self._queue.put(("file", state, path))

    def close_part(self, tmp_dir: Path) -> None:
        self._queue.put(("part", None, str(tmp_dir)))

    def _run(self) -> None:
        try:  # Linux: a thread has its own nice value; the writer yields the cores to training
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            kind, state, path = self._queue.get()
            try:
                if self._error is None:
                    if kind == "file":
                        self.files.write(state, path)
                    else:
                        tmp_dir = Path(path)
                        written = self.files.take_written(tmp_dir)
                        _write_json(part_marker(tmp_dir, self.rank), {"files": written})
            except BaseException as exc:  # noqa: BLE001 - reported by wait() on the main thread
                self._error = RuntimeError(f"{path}: {type(exc).__name__}: {exc}")
                log.error("asynchronous checkpoint write failed: %s", self._error)
                tmp_dir = Path(path) if kind == "part" else Path(path).parent
                try:  # rank 0's finaliser stops waiting for this part at once
                    _write_json(failed_marker(tmp_dir, self.rank), {"error": str(self._error)})
                except OSError:
                    pass
            finally:
                del state
                self._queue.task_done()

    def busy(self) -> bool:
        return self._queue.unfinished_tasks > 0

    def wait(self) -> str | None:
        """Block until everything queued is written; the error met, if any (then cleared)."""
        self._queue.join()
        error, self._error = self._error, None
        return None if error is None else str(error)


def wait_for_parts(
    tmp_dir: Path, world_size: int, deadline: float, hurry: threading.Event
) -> list[int]:
    """Rank 0's finaliser: list TMP_DIR/.parts every POLL_S (one listing from one rank, however
    many ranks), every HURRY_POLL_S once HURRY is set (training waits for this checkpoint),
    until every rank's marker is there or DEADLINE (time.monotonic) passes; returns the ranks
    still missing (empty: all written). A rank's failure marker raises at once.
    DEADLINE is checkpoint.save_timeout_s from the start of the save: a background write that
    takes longer is not published (the run stops at the next save naming it)."""
    parts = Path(tmp_dir) / PARTS
    while True:
        present = {p.name for p in parts.iterdir()} if parts.is_dir() else set()
        failed = sorted(n for n in present if n.endswith(".failed"))
        if failed:
            error = json.loads((parts / failed[0]).read_text())["error"]
            raise RuntimeError(f"rank {int(failed[0][4:9])}'s write failed: {error}")
        missing = [r for r in range(world_size) if f"rank{r:05d}.json" not in present]
        if not missing or time.monotonic() > deadline:
            return missing
        if hurry.is_set():
            time.sleep(HURRY_POLL_S)
        else:
            hurry.wait(POLL_S)


def read_parts(tmp_dir: Path, world_size: int) -> dict[str, tuple[int, str]]:
    """The files (relative name -> (size, crc32)) that every rank's marker lists."""
    written: dict[str, tuple[int, str]] = {}
    for r in range(world_size):
        files = json.loads(part_marker(tmp_dir, r).read_text())["files"]
        written.update({k: (int(v[0]), str(v[1])) for k, v in files.items()})
    return written


def check_sizes(tmp_dir: Path, written: dict[str, tuple[int, str]]) -> str | None:
    """None when each file on disk has the size its writer recorded, else the first mismatch."""
    for name, (size, _) in sorted(written.items()):
        path = Path(tmp_dir) / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes on disk, {size} written"
    return None
