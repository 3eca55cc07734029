"""On-disk cache of dataset indices: `.npy` files in a directory named by a hash of their inputs.

Layout: `CACHE_DIR/NAME-HASH/` holds one `KEY.npy` per array and `manifest.json` (the full
description the hash was taken of, and each file's shape, dtype, byte size and a CRC of its
first and last MiB). A directory is trusted only when every check passes; anything else
(truncated, stale, half-copied) is rebuilt.

Concurrency: every rank may call `load_or_build`; the first to take the lock file
`CACHE_DIR/.locks/NAME-HASH.lock` (fcntl.flock) builds into a temporary directory and renames
it into place, the others wait on the lock by polling (no collective, so no NCCL/gloo timeout),
then load. flock locks die with their process, so a crashed builder never leaves a stale lock.
Where the file system refuses flock (Lustre mounted `noflock`), ranks build concurrently and
the atomic rename keeps exactly one result (all results are identical).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_ext.filelock import FileLock
from megatron_ext.log import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
_CRC_SPAN = 1 << 20


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Size and modification time of a file: a dataset rewritten in place changes its hash."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def description_hash(description: dict) -> str:
    blob = json.dumps(description, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _crc_head_tail(path: Path) -> int:
    size = path.stat().st_size
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(_CRC_SPAN))
        if size > _CRC_SPAN:
            f.seek(max(_CRC_SPAN, size - _CRC_SPAN))
            crc = zlib.crc32(f.read(_CRC_SPAN), crc)
    return crc


@dataclass
class CacheResult:
    arrays: dict[str, np.ndarray]  # memory-mapped, read-only
    path: Path
    built: bool  # True when this process built the entry


class IndexCache:
    """A directory of cached index arrays; see the module docstring for the protocol.

    poll_seconds: how often a waiting process retries the lock; timeout: give up waiting after
    this many seconds (None: wait as long as the build takes).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        poll_seconds: float = 0.2,
        timeout: float | None = None,
        log_every: float = 60.0,
    ):
        self.cache_dir = Path(cache_dir)
        self.poll_seconds, self.timeout, self.log_every = poll_seconds, timeout, log_every

    def entry_path(self, name: str, description: dict) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80]
        return self.cache_dir / f"{safe}-{description_hash(description)}"

    def load(self, name: str, description: dict) -> dict[str, np.ndarray] | None:
        """The cached arrays (memory-mapped), or None when absent, stale or damaged."""
        path = self.entry_path(name, description)
        if not path.is_dir():
            return None
        problem = self._validate(path, description)
        if problem is None:
            manifest = json.loads((path / MANIFEST).read_text())
            return {key: np.load(path / f"{key}.npy", mmap_mode="r") for key in manifest["files"]}
        log.warning(f"{path}: {problem}; rebuilding this index")
        return None

    def _validate(self, path: Path, description: dict) -> str | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return f"no readable {MANIFEST} (interrupted build?)"
        if manifest.get("description") != json.loads(json.dumps(description)):
            return "made for other inputs (stale)"
        for key, meta in manifest.get("files", {}).items():
            file = path / f"{key}.npy"
            try:
                if file.stat().st_size != meta["bytes"]:
                    return f"{file.name} has {file.stat().st_size} bytes, expected {meta['bytes']}"
                arr = np.load(file, mmap_mode="r")
                if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                    found, wanted = (
                        f"{arr.dtype}{list(arr.shape)}",
                        f"{meta['dtype']}{meta['shape']}",
                    )
                    return f"{file.name} holds {found}, expected {wanted}"
                if _crc_head_tail(file) != meta["crc"]:
                    return f"{file.name} content does not match its checksum"
            except (OSError, ValueError) as exc:
                return f"{file.name} unreadable ({exc})"
        return None

    def load_or_build(
        self, name: str, description: dict, build: Callable[[], dict[str, np.ndarray]]
    ) -> CacheResult:
        """Load the entry, or build it under the lock (waiting while another process builds)."""
        path = self.entry_path(name, description)
        arrays = self.load(name, description)
        if arrays is not None:
            return CacheResult(arrays, path, built=False)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / ".locks").mkdir(exist_ok=True)
        lock_path = self.cache_dir / ".locks" / f"{path.name}.lock"
        with FileLock(lock_path, self.poll_seconds, self.timeout, self.log_every):
            arrays = self.load(name, description)  # built by another process while we waited
            if arrays is not None:
                return CacheResult(arrays, path, built=False)
            start = time.perf_counter()
            self._write(path, description, build())
            log.info(f"built {path.name} in {time.perf_counter() - start:.1f} s")
        arrays = self.load(name, description)
        if arrays is None:
            raise RuntimeError(
                f"{path}: the index just written does not read back; is the disk full?"
            )
        return CacheResult(arrays, path, built=True)

    def _write(self, path: Path, description: dict, arrays: dict[str, np.ndarray]) -> None:
        tmp = path.with_name(f".tmp-{path.name}-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files = {}
            for key, arr in arrays.items():
                file = tmp / f"{key}.npy"
                np.save(file, np.ascontiguousarray(arr))
                files[key] = {
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "bytes": file.stat().st_size,
                    "crc": _crc_head_tail(file),
                }
            manifest = {"description": description, "files": files, "created": time.time()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            self._publish(tmp, path, description)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, tmp: Path, path: Path, description: dict) -> None:
        if path.exists():  # damaged or stale (we hold the lock): move it aside, then drop it
            trash = path.with_name(f".stale-{path.name}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(path, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp, path)
        except OSError as exc:  # a builder on a node without a shared lock won the race
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or self._validate(
                path, description
            ):
                raise
