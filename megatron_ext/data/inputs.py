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

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_SUFFIXES = (".txt",)
COMPRESSED = (".gz", ".zst")
TXT_MODES = ("file", "blank-line")


@dataclass(frozen=True)
class Chunk:
    """A slice of one input file holding whole records."""

    index: int  # position in the global chunk stream
    path: str
    kind: str  # "jsonl" | "txt-file" | "txt-blocks"
    first_line: int  # 1-based line number of data[0]
    data: bytes
    disk_bytes: int  # bytes of the (possibly compressed) file consumed, for progress


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
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(spec)
                for name in names
                if input_kind(name)
            )
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
    paths: list[str], chunk_bytes: int = 1 << 20, txt_mode: str = "file"
) -> Iterator[Chunk]:
    """Yield chunks of whole records from the files in order."""
    if txt_mode not in TXT_MODES:
        raise UserError(f"unknown txt mode {txt_mode!r}; choose one of {', '.join(TXT_MODES)}")
    index = 0
    for path in paths:
        kind = input_kind(path)
        stream, raw = open_input(path)
        with stream:
            try:
                if kind == "txt" and txt_mode == "file":
                    yield Chunk(index, path, "txt-file", 1, stream.read(), raw.count)
                    index += 1
                    continue
                sep = b"\n" if kind == "jsonl" else b"\n\n"
                chunk_kind = "jsonl" if kind == "jsonl" else "txt-blocks"
                line, carry, last_count = 1, b"", 0
                while True:
                    block = stream.read(chunk_bytes)
                    data = carry + block
                    if not block:
                        if data:
                            yield Chunk(index, path, chunk_kind, line, data, raw.count - last_count)
                            index += 1
                        break
                    cut = data.rfind(sep)
                    if cut < 0:
                        carry = data
                        continue
                    cut += len(sep)
                    piece, carry = data[:cut], data[cut:]
                    yield Chunk(index, path, chunk_kind, line, piece, raw.count - last_count)
                    last_count = raw.count
                    index += 1
                    line += piece.count(b"\n")
            except (OSError, EOFError) as exc:
                raise UserError(f"{path}: read failed ({exc}); is the file truncated?") from None
            except UserError:
                raise
            except Exception as exc:  # zstandard's ZstdError
                raise UserError(f"{path}: read failed ({exc}); is the file truncated?") from None


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
