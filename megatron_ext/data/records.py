"""Turning a chunk of input bytes into packed tokens: parsing, validation, tokenization.

Runs inside preprocessing workers (or inline with one worker). A bad record is skipped and
counted by reason, or, in strict mode, stops the chunk with `file:line: reason`.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from megatron_ext.data.inputs import DEFAULT_MAX_RECORD_BYTES, Chunk

MAX_EXAMPLES = 5
MAX_OTHER_KEYS = 100  # distinct keys remembered from records that lack the JSON key
_KEYS_PER_RECORD = 20
_BLANK_LINE = re.compile(rb"\n[ \t\r]*\n")


@dataclass
class ChunkResult:
    index: int
    tokens: bytes = b""
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    documents: int = 0
    disk_bytes: int = 0
    text_bytes: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    other_keys: Counter = field(default_factory=Counter)  # keys of records lacking the key
    fatal: str | None = None


@dataclass(frozen=True)
class RecordOptions:
    json_key: str = "text"
    strict: bool = False
    eod: int | None = None  # appended to every document when not None
    dtype_code: int = 4
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES


class _BadRecord(Exception):
    def __init__(self, reason: str, detail: str, keys: tuple[str, ...] = ()):
        super().__init__(detail)
        self.reason, self.detail, self.keys = reason, detail, keys


def _too_large(size: int, limit: int) -> _BadRecord:
    return _BadRecord(
        "record too large", f"record of {size:,} bytes is over --max-record-bytes ({limit:,})"
    )


def _parse_json_line(line: bytes, key: str) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadRecord("invalid UTF-8", f"invalid UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRecord(
            "malformed JSON", f"malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if not isinstance(obj, dict):
        raise _BadRecord("not a JSON object", f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        keys = tuple(itertools.islice(obj, _KEYS_PER_RECORD))
        raise _BadRecord("missing key", f"missing key {key!r}", keys)
    value = obj[key]
    if not isinstance(value, str):
        raise _BadRecord(
            "non-string value", f"value of {key!r} is {type(value).__name__}, not a string"
        )
    if not value.strip():
        raise _BadRecord("empty document", "empty document")
    return value


def iter_records(chunk: Chunk, key: str, max_bytes: int = DEFAULT_MAX_RECORD_BYTES):
    """Yield (line number, text or _BadRecord) for each record of the chunk.

    A record over `max_bytes` is a _BadRecord, never parsed (a tokenizer needs ~100x its size).
    """
    if chunk.oversized:
        yield chunk.first_line, _too_large(chunk.oversized, max_bytes)
        return
    if chunk.kind == "jsonl":
        line_no = chunk.first_line
        for line in chunk.data.split(b"\n"):
            if len(line) > max_bytes:
                yield line_no, _too_large(len(line), max_bytes)
            elif line.strip():
                try:
                    yield line_no, _parse_json_line(line, key)
                except _BadRecord as bad:
                    yield line_no, bad
            line_no += 1
        return
    if chunk.kind == "txt-file":
        blocks = [(chunk.first_line, chunk.data)]
    else:
        blocks, start, line_no = [], 0, chunk.first_line
        for m in _BLANK_LINE.finditer(chunk.data):
            blocks.append((line_no, chunk.data[start : m.start()]))
            line_no += chunk.data.count(b"\n", start, m.end())
            start = m.end()
        blocks.append((line_no, chunk.data[start:]))
    for line_no, raw in blocks:
        if not raw.strip():
            if chunk.kind == "txt-file":
                yield line_no, _BadRecord("empty document", "empty document")
            continue
        # a block starts at its first non-blank line
        line_no += raw[: len(raw) - len(raw.lstrip())].count(b"\n")
        if len(raw) > max_bytes:
            yield line_no, _too_large(len(raw), max_bytes)
            continue
        try:
            yield line_no, raw.decode("utf-8").strip("\r\n")
        except UnicodeDecodeError as exc:
            yield line_no, _BadRecord("invalid UTF-8", f"invalid UTF-8 at byte {exc.start}")


def _tokenize(tokenizer, texts: list[str]) -> list:
    """encode_batch; on failure find the documents that cannot be encoded (e.g. lone surrogates)."""
    try:
        return tokenizer.encode_batch(texts)
    except Exception:
        out = []
        for text in texts:
            try:
                out.append(tokenizer.encode(text))
            except Exception as exc:
                out.append(_BadRecord("cannot be tokenized", f"cannot be tokenized ({exc})"))
        return out


def process_chunk(chunk: Chunk, tokenizer, opts: RecordOptions) -> ChunkResult:
    """Parse, validate and tokenize one chunk; tokens come back packed in the output dtype."""
    from megatron_ext import _data_cpp

    result = ChunkResult(chunk.index, disk_bytes=chunk.disk_bytes, text_bytes=len(chunk.data))

    def skip(line_no: int, bad: _BadRecord) -> bool:
        where = f"{chunk.path}:{line_no}: {bad.detail}"
        if opts.strict:
            result.fatal = where
            return True
        result.skipped[bad.reason] += 1
        if len(result.examples) < MAX_EXAMPLES:
            result.examples.append(where)
        if len(result.other_keys) < MAX_OTHER_KEYS:
            result.other_keys.update(bad.keys)
        return False

    lines, texts = [], []
    for line_no, rec in iter_records(chunk, opts.json_key, opts.max_record_bytes):
        if isinstance(rec, _BadRecord):
            if skip(line_no, rec):
                return result
            continue
        lines.append(line_no)
        texts.append(rec)
    docs = []
    for line_no, ids in zip(lines, _tokenize(tokenizer, texts), strict=True):
        if isinstance(ids, _BadRecord):
            if skip(line_no, ids):
                return result
            continue
        if len(ids) == 0 and opts.eod is None:
            if skip(line_no, _BadRecord("empty document", "no tokens after tokenization")):
                return result
            continue
        docs.append(ids)
    eod = -1 if opts.eod is None else opts.eod
    try:
        result.tokens, result.lengths = _data_cpp.pack_documents(docs, opts.dtype_code, eod)
    except ValueError as exc:
        result.fatal = f"{chunk.path}: {exc}"
    result.documents = len(docs)
    return result


# --- worker process state (one tokenizer per process) ---
_WORKER: dict = {}
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def init_worker(
    tokenizer_path: str, eod_token: str | None, opts: RecordOptions, threads: int, parent_pid: int
) -> None:
    exit_with_parent(parent_pid)
    # Workers are the parallelism: keep the tokenizer's own thread pool to `threads`.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    from megatron_ext.data.tokenizer import load_tokenizer

    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path, eod_token)
    _WORKER["opts"] = opts


def worker_process_chunk(chunk: Chunk) -> ChunkResult:
    return process_chunk(chunk, _WORKER["tokenizer"], _WORKER["opts"])


def exit_with_parent(parent_pid: int) -> None:
    """End this worker when the main process `parent_pid` dies, even by SIGKILL.

    An orphaned worker would otherwise wait forever on its task queue (it holds the queue's
    write end itself). Linux: the kernel sends SIGKILL on the parent's death (PR_SET_PDEATHSIG;
    strictly, when the thread that started the worker ends: the pool starts its workers from
    the thread that runs `preprocess`, which outlives them). Elsewhere a daemon thread polls the
    parent's id.
    """
    if not _set_parent_death_signal(signal.SIGKILL):
        _watch_parent(parent_pid)
    elif os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _watch_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Exit this process (from a daemon thread) once its parent is no longer `parent_pid`."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
