"""An exclusive lock file (fcntl.flock) that says who holds it.

flock locks die with their process, so a crashed holder never leaves a stale lock. Where the
file system refuses flock (Lustre mounted `noflock`) the lock warns and is not held
(`supported` False). `timeout=0` gives up at once: `LockHeld` names the holder.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from megatron_ext.log import get_logger

log = get_logger(__name__)


class LockHeld(TimeoutError):
    """The lock is held by another process (the message names its host and pid)."""


class FileLock:
    """Exclusive flock on `path`, waiting by polling (and saying who holds it)."""

    def __init__(self, path: Path, poll_seconds: float, timeout: float | None, log_every: float):
        self.path, self.poll, self.timeout, self.log_every = path, poll_seconds, timeout, log_every
        self._fd: int | None = None
        self.supported = True

    def __enter__(self) -> FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        start = last_log = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    log.warning(
                        f"{self.path}: file locks not supported here ({exc.strerror}); "
                        "going on without a lock"
                    )
                    self.supported = False
                    break
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            now = time.monotonic()
            if self.timeout is not None and now - start >= self.timeout:
                os.close(fd)
                raise LockHeld(
                    f"{self.path}: still locked by {self.holder()} after {self.timeout:.0f} s"
                )
            if now - last_log >= self.log_every:
                log.info(f"waiting for {self.path} held by {self.holder()} ({now - start:.0f} s)")
                last_log = now
            time.sleep(self.poll)
        self._fd = fd
        if self.supported:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        return self

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            if self.supported:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def take_lock(path: Path) -> tuple[FileLock | None, str | None]:
    """(the lock at PATH, held now, None) or (None, who holds it): no waiting."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(Path(path), poll_seconds=0.1, timeout=0, log_every=1e9)
    try:
        lock.__enter__()
    except LockHeld:
        return None, lock.holder()
    return lock, None
