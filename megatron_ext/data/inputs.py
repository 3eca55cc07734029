"""Corpus inputs for preprocessing: discovery, opening (plain, gzip, zstd) and chunking.

Kinds of input:
- JSON Lines (`.jsonl`, `.json`, optionally `.gz`/`.zst` compressed): one document per line;
- plain text (`.txt`, optionally compressed): one document per file (`txt_mode="file"`) or one
  document per block of lines separated by blank lines (`txt_mode="blank-line"`).

Chunks are cut at record boundaries and never span files. The main process only reads and
cuts bytes; parsing and tokenizing happen in the workers.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_SUFFIXES = (".txt",)
COMPRESSED = (".gz", ".zst")
TXT_MODES = ("file", "blank-line")
# One record is parsed and tokenized whole; a tokenizer needs ~100x its size in memory.
DEFAULT_MAX_RECORD_BYTES = 16 << 20


@dataclass(frozen=True)
class Chunk:
    """A slice of one input file holding whole records."""

    index: int  # position in the global chunk stream
    path: str
    kind: str  # "jsonl" | "txt-file" | "txt-blocks"
    first_line: int  # 1-based line number of data[0]
    data: bytes
    disk_bytes: int  # bytes of the (possibly compressed) file consumed, for progress
    oversized: int = 0  # a record over the size limit: its length; `data` is then empty


def input_kind(path: str | os.PathLike) -> str | None:
    """'jsonl', 'txt' or None for files we do not read."""
    name = os.fspath(path).lower()
    for comp in COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TXT_SUFFIXES):
        return "txt"
    return None


def expand_inputs(specs: list[str]) -> list[str]:
    """Files named by paths, directories (searched recursively) and globs, in a stable order.

    Explicit files keep the order given; a directory or glob contributes its matches sorted.
    Duplicates are dropped. Every named thing must exist and match at least one input file.
    """
    files: list[str] = []
    for spec in specs:
        if any(ch in spec for ch in "*?["):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise UserError(f"{spec}: the pattern matches no file")
            files += matches
        elif os.path.isdir(spec):
            found = walk_inputs(spec)
            if not found:
                raise UserError(
                    f"{spec}: directory holds no .jsonl/.json/.txt input (optionally .gz/.zst)"
                )
            files += found
        elif os.path.isfile(spec):
            if input_kind(spec) is None:
                raise UserError(
                    f"{spec}: unknown input type (expected .jsonl, .json, .txt, optionally .gz/.zst)"
                )
            files.append(spec)
        else:
            raise UserError(f"{spec}: no such file or directory")
    seen: set[str] = set()
    unique = []
    for f in files:
        key = os.path.realpath(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def walk_inputs(top: str) -> list[str]:
    """Input files under directory `top`, sorted, following symlinked directories.

    Each real directory is read once: a symlink loop, or a directory reached through two
    paths, is read under the first path met (walking in sorted order) and logged.
    """
    found: list[str] = []
    seen: set[str] = set()

    def unreadable(exc: OSError) -> None:
        raise UserError(
            f"{exc.filename}: cannot list directory ({exc.strerror or exc}); "
            "fix its permissions or leave it out of --input"
        )

    for root, dirs, names in os.walk(top, onerror=unreadable, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            log.warning("%s: directory %s was already read; not reading it again", root, real)
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        found += (os.path.join(root, name) for name in names if input_kind(name))
    return sorted(found)


class _Counting(io.RawIOBase):
    """Counts bytes read from the underlying file (compressed progress)."""

    def __init__(self, f):
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.count += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def open_input(path: str) -> tuple[io.BufferedIOBase, _Counting]:
    """A binary stream of the decompressed contents, and the counter of disk bytes read."""
    raw = _Counting(open(path, "rb"))
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=io.BufferedReader(raw)), raw
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise UserError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard)"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), raw
    return io.BufferedReader(raw, buffer_size=1 << 20), raw


def check_inputs(paths: list[str]) -> int:
    """Open each input and read its first bytes; returns the total size on disk."""
    total = 0
    for path in paths:
        try:
            stream, raw = open_input(path)
            with stream:
                stream.read(1)
        except UserError:
            raise
        except (OSError, EOFError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UserError(f"{path}: cannot read input ({reason})") from None
        except Exception as exc:  # zstandard raises its own error type for bad frames
            raise UserError(f"{path}: cannot read input ({exc})") from None
        total += os.path.getsize(path)
    return total


def iter_chunks(
    paths: list[str],
    chunk_bytes: int = 1 << 20,
    txt_mode: str = "file",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[Chunk]:
    """Yield chunks of whole records from the files in order.

    A record longer than `max_record_bytes` is never held whole: it is read past and stands for
    itself as a chunk with no data and `oversized` set to its length (its line is kept). At
    most `max_record_bytes + chunk_bytes` bytes of a file are held at a time.
    """
    if txt_mode not in TXT_MODES:
        raise UserError(f"unknown txt mode {txt_mode!r}; choose one of {', '.join(TXT_MODES)}")
    index = 0
    for path in paths:
        stream, raw = open_input(path)
        with stream:
            try:
                limits = (chunk_bytes, max_record_bytes)
                chunk_kind, pieces = _pieces(path, stream, raw, txt_mode, *limits)
                for first_line, data, disk_bytes, oversized in pieces:
                    yield Chunk(index, path, chunk_kind, first_line, data, disk_bytes, oversized)
                    index += 1
            except (OSError, EOFError) as exc:
                raise UserError(f"{path}: read failed ({exc}); is the file truncated?") from None
            except UserError:
                raise
            except Exception as exc:  # zstandard's ZstdError
                raise UserError(f"{path}: read failed ({exc}); is the file truncated?") from None


def _pieces(path: str, stream, raw: _Counting, txt_mode: str, chunk_bytes: int, max_bytes: int):
    """The chunk kind of `path` and its pieces: (first line, data, disk bytes, oversized)."""
    kind = input_kind(path)
    if kind == "txt" and txt_mode == "file":
        return "txt-file", _whole_file(stream, raw, max_bytes)
    if kind == "jsonl":
        return "jsonl", _RecordSplitter(stream, raw, b"\n", chunk_bytes, max_bytes).pieces()
    return "txt-blocks", _RecordSplitter(stream, raw, b"\n\n", chunk_bytes, max_bytes).pieces()


def _whole_file(stream, raw: _Counting, max_bytes: int):
    """The one piece of a one-document .txt file: (line, data, disk bytes, oversized)."""
    parts, size = [], 0
    while size <= max_bytes and (block := stream.read(max_bytes + 1 - size)):
        parts.append(block)
        size += len(block)
    if size <= max_bytes:
        return [(1, b"".join(parts), raw.count, 0)]
    del parts
    while block := stream.read(1 << 20):  # only its length is needed
        size += len(block)
    return [(1, b"", raw.count, size)]


class _RecordSplitter:
    """Cuts a stream into pieces of whole records separated by `sep`, with bounded memory."""

    def __init__(self, stream, raw: _Counting, sep: bytes, chunk_bytes: int, max_record: int):
        self.stream, self.raw, self.sep = stream, raw, sep
        self.chunk_bytes, self.max_record = chunk_bytes, max_record
        self.line, self.counted = 1, 0

    def _disk_bytes(self) -> int:
        n, self.counted = self.raw.count - self.counted, self.raw.count
        return n

    def pieces(self):
        """Yield (first line, data, disk bytes, oversized length or 0)."""
        carry = b""
        while True:
            block = self.stream.read(self.chunk_bytes)
            data = carry + block
            if not block:
                if data:
                    yield self.line, data, self._disk_bytes(), 0
                return
            cut = data.rfind(self.sep)
            if cut >= 0:
                cut += len(self.sep)
                piece, carry = data[:cut], data[cut:]
                yield self.line, piece, self._disk_bytes(), 0
                self.line += piece.count(b"\n")
            elif len(data) > self.max_record:  # one record, already too long: read past it
                size, newlines, carry = self._skip_record(data)
                yield self.line, b"", self._disk_bytes(), size
                self.line += newlines
            else:
                carry = data

    def _skip_record(self, data: bytes) -> tuple[int, int, bytes]:
        """Read past the record starting at data[0]: (its length, its newlines, what follows)."""
        size, newlines, keep = 0, 0, len(self.sep) - 1  # keep: a separator may straddle reads
        while True:
            cut = data.find(self.sep)
            if cut >= 0:
                newlines += data.count(b"\n", 0, cut + len(self.sep))
                return size + cut, newlines, data[cut + len(self.sep) :]
            head = len(data) - keep if len(data) > keep else 0
            size, newlines = size + head, newlines + data.count(b"\n", 0, head)
            block = self.stream.read(self.chunk_bytes)
            if not block:
                return size + len(data) - head, newlines + data.count(b"\n", head), b""
            data = data[head:] + block


def split_contiguous(paths: list[str], num_parts: int) -> list[list[str]]:
    """Split files into `num_parts` contiguous groups of similar total size (file order kept)."""
    sizes = [max(1, Path(p).stat().st_size) for p in paths]
    total = sum(sizes)
    parts: list[list[str]] = [[] for _ in range(num_parts)]
    acc = 0
    for path, size in zip(paths, sizes, strict=True):
        # the group whose share of the byte range holds this file's midpoint
        part = min(num_parts - 1, int((acc + size / 2) * num_parts / total))
        parts[part].append(path)
        acc += size
    return parts
