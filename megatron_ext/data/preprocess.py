"""Corpus preprocessing: input files -> one Megatron indexed dataset (`PREFIX.bin`/`.idx`).

Pipeline: the main process cuts the inputs into chunks of whole records (~1 MB), a pool of
worker processes parses and tokenizes them and sends back tokens packed in the output dtype,
and the main process streams them, in input order, through the C++ writer. At most
`2 x workers` chunks are in flight, so memory does not grow with the corpus, and a record is
held whole only up to `max_record_bytes`. The output depends only on the inputs and the
tokenizer, never on the worker count. Workers exit when the main process dies, even by SIGKILL.

Under MPI (`mpirun`/`srun --mpi=pmix` with mpi4py), the input files are split into contiguous
groups, one per rank; each rank writes a shard and rank 0 concatenates the shards in order,
so the result equals a single-process run.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.data import inputs as inputs_mod
from megatron_ext.data.indexed_dataset import (
    CODE_OF_DTYPE,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    optimal_dtype,
)
from megatron_ext.data.records import (
    MAX_EXAMPLES,
    MAX_OTHER_KEYS,
    ChunkResult,
    RecordOptions,
    init_worker,
    process_chunk,
    worker_process_chunk,
)
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer: str
    json_key: str = "text"
    workers: int = 1
    append_eod: bool = False
    eod_token: str | None = None  # token string or id; default: the tokenizer's end-of-text token
    strict: bool = False
    txt_mode: str = "file"  # "file": one document per .txt file; "blank-line": per block
    chunk_bytes: int = 1 << 20
    progress: bool | None = None  # None: only on a terminal
    tokenizer_threads: int = 1  # threads inside each worker's tokenizer
    mpi: str = "auto"  # "auto": use MPI when launched by mpirun/srun with >1 rank; "off"
    overwrite: bool = False  # replace an existing PREFIX.bin/.idx (else refuse to start)
    max_record_bytes: int = inputs_mod.DEFAULT_MAX_RECORD_BYTES  # longer records are bad records


# skip reasons of records that do have the --json-key field
_KEY_SEEN_REASONS = {"non-string value", "empty document", "cannot be tokenized"}


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


@dataclass
class PreprocessSummary:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    text_bytes: int = 0
    bytes_out: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    other_keys: Counter = field(default_factory=Counter)  # keys of records lacking --json-key
    seconds: float = 0.0
    dtype: str = ""

    def merge(self, other: PreprocessSummary) -> None:
        for name in ("files", "documents", "tokens", "bytes_in", "text_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.add_skipped(other)

    def format(self) -> str:
        secs = max(self.seconds, 1e-9)
        lines = [
            f"files: {self.files}  documents: {self.documents:,}  tokens: {self.tokens:,}  dtype: {self.dtype}",
            f"bytes in: {self.bytes_in:,} (text {self.text_bytes:,})  bytes out: {self.bytes_out:,}",
            f"time: {self.seconds:.1f} s  ({self.documents / secs:,.0f} docs/s, "
            f"{self.text_bytes / secs / 1e6:.2f} MB/s, {self.tokens / secs:,.0f} tokens/s)",
        ]
        if self.skipped:
            total = sum(self.skipped.values())
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
            lines.append(f"skipped records: {total} ({reasons})")
            lines += [f"  {e}" for e in self.examples]
        return "\n".join(lines)

    def add_skipped(self, other: PreprocessSummary | ChunkResult) -> None:
        self.skipped.update(other.skipped)
        self.examples += other.examples[: max(0, MAX_EXAMPLES - len(self.examples))]
        if len(self.other_keys) < MAX_OTHER_KEYS:
            self.other_keys.update(other.other_keys)

    def no_documents_error(self, files: list[str], json_key: str) -> UserError:
        """Why no document was usable: skipped records by reason, a --json-key that no record has."""
        where = f"no usable documents in {', '.join(files)}; nothing written"
        if not self.skipped:
            return UserError(f"{where}: the inputs hold no records (empty files?)")
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        parts = [f"{where}: {_plural(total, 'record')} skipped ({reasons})"]
        if self.skipped["missing key"]:
            parts.append(self._missing_key_hint(json_key))
        parts.append("first: " + "; ".join(self.examples[:3]))
        return UserError("; ".join(parts))

    def _missing_key_hint(self, json_key: str) -> str:
        keys = ", ".join(repr(k[:40]) for k, _ in self.other_keys.most_common(10)) or "none"
        if not self.skipped.keys() & _KEY_SEEN_REASONS:
            return (
                f"no record has the key {json_key!r} (--json-key); the records have keys {keys}: "
                "pass --json-key with the one that holds the text"
            )
        n = self.skipped["missing key"]
        verb = "lack" if n > 1 else "lacks"
        return (
            f"{_plural(n, 'record')} {verb} the key {json_key!r} (--json-key); their keys: {keys}"
        )


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


def check_output_prefix(prefix: str, overwrite: bool = False) -> None:
    """Create the output directory and make sure we can write there, before any work.

    An existing `PREFIX.bin` or `.idx` is refused unless `overwrite` (then the run replaces it
    at the end, by rename, so a failed run leaves it as it was).
    """
    if os.path.basename(prefix) in ("", ".", ".."):  # "out/" would write a hidden out/.bin
        raise UserError(
            f"--output-prefix {prefix!r}: the output prefix needs a file name part after the "
            "last '/' (e.g. data/fi_text writes data/fi_text.bin and data/fi_text.idx)"
        )
    for path in (data_file_path(prefix), index_file_path(prefix)):
        if os.path.exists(path) and not overwrite:
            raise UserError(
                f"{path} already exists; pass --overwrite to replace it, "
                "or choose another --output-prefix"
            )
    out_dir = Path(prefix).resolve().parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".megatron-ext-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"{out_dir}: output directory cannot be written ({exc.strerror or exc})"
        ) from None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under Slurm or taskset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    cpus = available_cpus()
    if workers > cpus:
        log.warning(
            "--workers %d is more than the %s this process may use: workers compete for them "
            "and the run gets slower, not faster; use --workers %d or fewer",
            workers,
            _plural(cpus, "CPU"),
            cpus,
        )


def _prepare(cfg: PreprocessConfig):
    """Everything that can fail on bad input, before any work: returns (files, tokenizer, opts)."""
    from megatron_ext.data.tokenizer import load_tokenizer

    _check_workers(cfg.workers)
    if cfg.max_record_bytes < 1:
        raise UserError(f"--max-record-bytes must be at least 1 (got {cfg.max_record_bytes})")
    if cfg.txt_mode not in inputs_mod.TXT_MODES:
        raise UserError(f"unknown --txt-mode {cfg.txt_mode!r}; choose file or blank-line")
    files = inputs_mod.expand_inputs(cfg.inputs)
    inputs_mod.check_inputs(files)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.eod_token)
    if cfg.append_eod and tokenizer.eod_id is None:
        raise UserError(f"{cfg.tokenizer}: no end-of-document token found; pass --eod-token")
    check_output_prefix(cfg.output_prefix, cfg.overwrite)
    dtype = optimal_dtype(tokenizer.vocab_size)
    opts = RecordOptions(
        json_key=cfg.json_key,
        strict=cfg.strict,
        eod=tokenizer.eod_id if cfg.append_eod else None,
        dtype_code=CODE_OF_DTYPE[dtype],
        max_record_bytes=cfg.max_record_bytes,
    )
    return files, tokenizer, opts, dtype


def _progress_bar(cfg: PreprocessConfig, total: int):
    from tqdm import tqdm

    disable = None if cfg.progress is None else not cfg.progress
    return tqdm(
        total=total, unit="B", unit_scale=True, desc="preprocess", disable=disable, smoothing=0.1
    )


def _write(cfg, files, tokenizer, opts, dtype, prefix: str, allow_empty: bool) -> PreprocessSummary:
    """Run the worker pool over `files` and write `prefix` atomically."""
    summary = PreprocessSummary(files=len(files), dtype=str(dtype))
    start = time.perf_counter()
    total = sum(os.path.getsize(f) for f in files)
    executor = None
    if cfg.workers > 1:
        executor = ProcessPoolExecutor(
            cfg.workers,
            mp_context=mp.get_context("spawn"),
            initializer=init_worker,
            initargs=(cfg.tokenizer, cfg.eod_token, opts, cfg.tokenizer_threads, os.getpid()),
        )
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    bar = _progress_bar(cfg, total)
    try:
        with IndexedDatasetBuilder(prefix, dtype) as builder:

            def consume(res) -> None:
                if res.fatal:
                    raise UserError(
                        f"{res.fatal} (stopped at the first bad record; nothing written)"
                    )
                builder.add_packed(res.tokens, res.lengths)
                summary.documents += res.documents
                summary.tokens += int(res.lengths.sum(dtype="int64"))
                summary.bytes_in += res.disk_bytes
                summary.text_bytes += res.text_bytes
                summary.add_skipped(res)
                bar.update(res.disk_bytes)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(
                    docs_s=f"{summary.documents / elapsed:,.0f}",
                    tok_s=f"{summary.tokens / elapsed:,.0f}",
                )

            chunks = inputs_mod.iter_chunks(
                files, cfg.chunk_bytes, cfg.txt_mode, cfg.max_record_bytes
            )
            if executor is None:
                for chunk in chunks:
                    consume(process_chunk(chunk, tokenizer, opts))
            else:
                inflight: deque = deque()
                for chunk in chunks:
                    inflight.append(executor.submit(worker_process_chunk, chunk))
                    if len(inflight) >= 2 * cfg.workers:
                        consume(inflight.popleft().result())
                while inflight:
                    consume(inflight.popleft().result())
            if summary.documents == 0 and not allow_empty:
                raise summary.no_documents_error(files, cfg.json_key)
            builder.finalize()
    except _Terminated as exc:
        raise UserError(f"preprocessing stopped by {exc}; no output written") from None
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, old_handler)
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    summary.seconds = time.perf_counter() - start
    summary.bytes_out = os.path.getsize(data_file_path(prefix)) + os.path.getsize(
        index_file_path(prefix)
    )
    return summary


def _mpi_comm(mode: str):
    """COMM_WORLD when launched by an MPI launcher with more than one rank, else None."""
    if mode == "off":
        return None
    launched = any(
        k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK")
    )
    if not launched:
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        size = os.environ.get("OMPI_COMM_WORLD_SIZE", "1")
        if size != "1":
            raise UserError(
                "launched under MPI but mpi4py is not installed (pip install mpi4py)"
            ) from None
        return None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 else None


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary | None:
    """Tokenize `cfg.inputs` into `cfg.output_prefix`.{bin,idx}; returns the run's summary.

    Raises `UserError` (naming file and line) for bad inputs; no output is left behind then.
    Under MPI only rank 0 gets the summary (of the whole run); other ranks get None.
    """
    comm = _mpi_comm(cfg.mpi)
    if comm is None:
        files, tokenizer, opts, dtype = _prepare(cfg)
        summary = _write(cfg, files, tokenizer, opts, dtype, cfg.output_prefix, allow_empty=False)
        log.info("wrote %s.bin and %s.idx", cfg.output_prefix, cfg.output_prefix)
        return summary
    return _preprocess_mpi(cfg, comm)


def _preprocess_mpi(cfg: PreprocessConfig, comm) -> PreprocessSummary:
    rank, size = comm.Get_rank(), comm.Get_size()
    shard = f"{cfg.output_prefix}.mpi-shard-{rank:05d}-of-{size:05d}"
    summary, error = None, None
    start = time.perf_counter()
    try:
        files, tokenizer, opts, dtype = _prepare(cfg)
        mine = inputs_mod.split_contiguous(files, size)[rank]
        if rank != 0:
            cfg = PreprocessConfig(**{**cfg.__dict__, "progress": False})
        summary = _write(cfg, mine, tokenizer, opts, dtype, shard, allow_empty=True)
    except UserError as exc:
        error = f"rank {rank}: {exc}"
    errors = [e for e in comm.allgather(error) if e]
    summaries = comm.gather(summary, root=0)
    final_error = None
    if rank == 0 and not errors:
        total = PreprocessSummary(dtype=str(dtype))
        try:
            with IndexedDatasetBuilder(cfg.output_prefix, dtype) as builder:
                for r in range(size):
                    builder.append_dataset(f"{cfg.output_prefix}.mpi-shard-{r:05d}-of-{size:05d}")
                for s in summaries:
                    total.merge(s)
                if total.documents == 0:
                    raise total.no_documents_error(files, cfg.json_key)
                builder.finalize()
            total.seconds = time.perf_counter() - start
            total.bytes_out = os.path.getsize(data_file_path(cfg.output_prefix)) + os.path.getsize(
                index_file_path(cfg.output_prefix)
            )
            summary = total
            log.info("merged %d rank shards into %s.bin and .idx", size, cfg.output_prefix)
        except UserError as exc:
            final_error = str(exc)
    comm.barrier()
    for path in (data_file_path(shard), index_file_path(shard)):
        if os.path.exists(path):
            os.remove(path)
    final_error = comm.bcast(final_error, root=0)
    if errors or final_error:
        raise UserError(errors[0] if errors else final_error)
    return summary if rank == 0 else None
