#!/usr/bin/env python3
"""Preprocessing throughput: `megatron-ext preprocess` against a Megatron-LM-style baseline and
against the tokenizer alone, and peak memory at two corpus sizes.

    python benchmarks/preprocess_throughput.py                                   # full: 200 MB
    python benchmarks/preprocess_throughput.py --size-mb 20 --rss-sizes-mb 10,40  # smoke test
    python benchmarks/preprocess_throughput.py --repeats 3 --record benchmarks/results/preprocess.md

Corpus: Debian's Finnish GIMP manual (tools/gimp_help_to_jsonl.py) repeated to at least
--size-mb; tokenizer: byte-level BPE trained on one copy with `megatron-ext train-tokenizer`.
Both are cached in --work-dir. All three sides encode the same documents with the same
Hugging Face tokenizer, one tokenizer thread per process. What is timed (wall clock):

- ours: `python -m megatron_ext preprocess --workers W --append-eod` as a subprocess, from
  launch to exit: interpreter start, imports, tokenizer load, worker start-up, reading,
  parsing, tokenizing, writing and publishing `.bin`/`.idx`.
- baseline: `python benchmarks/preprocess_throughput.py baseline ...` as a subprocess, launch
  to exit. It works the way Megatron-LM's tools/preprocess_data.py does: `multiprocessing.Pool`
  (fork), `pool.imap(encoder.encode, fin, 32)` over the lines of the file, one tokenizer call
  per document + EOD, token lists sent back to the parent, megatron-core's
  `IndexedDatasetBuilder.add_document` + `finalize`. Two variants of the tokenizer call, same
  tokenizer.json: A, `PreTrainedTokenizerFast(text).input_ids` as Megatron-LM's
  `HuggingFaceTokenizer` does; B, the raw Rust `Tokenizer.encode(text).ids`, which isolates
  the pipeline from the tokenizer wrapper.
- limit: W spawned processes, each already holding its share of the documents (every W-th
  line, decoded from JSON) and a loaded tokenizer, are released together by a barrier; timed
  from the release until the last one has run `encode_batch` over its share in batches of
  ~1 MiB of input (our default chunk). No start-up, no I/O, no packing, no writing.

Peak RSS: our CLI run as a subprocess, polled with psutil every 20 ms; the tree figure is the
largest sum of RSS over the CLI process and all its descendants (workers, resource tracker).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 32000
BATCH_BYTES = 1 << 20  # limit: input bytes per encode_batch call (= our default --chunk-mb 1)
RSS_POLL_S = 0.02
MB = 1e6


# ------------------------------------------------------------------ baseline (Megatron-LM style)


class MegatronStyleEncoder:
    """Megatron-LM's `Encoder` (tools/preprocess_data.py) for one JSON key, document level."""

    tokenizer = None  # set per worker by `initializer`, as in Megatron-LM

    def __init__(
        self, tokenizer_json: str, eod: int | None, json_key: str = "text", call: str = "rust"
    ):
        self.tokenizer_json, self.eod, self.json_key = tokenizer_json, eod, json_key
        self.call = call

    def initializer(self) -> None:
        # The thread settings of megatron_ext.data.records.init_worker (one tokenizer thread).
        os.environ["RAYON_NUM_THREADS"] = "1"
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if self.call == "transformers":
            # Megatron-LM's _HuggingFaceTokenizer: a transformers fast tokenizer, called per text
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_file=self.tokenizer_json)
            MegatronStyleEncoder.tokenize = staticmethod(lambda text: hf(text).input_ids)
        else:
            from tokenizers import Tokenizer

            rust = Tokenizer.from_file(self.tokenizer_json)
            MegatronStyleEncoder.tokenize = staticmethod(
                lambda text: rust.encode(text, add_special_tokens=False).ids
            )

    def encode(self, json_line: str):
        data = json.loads(json_line)
        text = data[self.json_key]
        sentences = text if isinstance(text, list) else [text]
        doc_ids, sentence_lens = [], []
        for sentence in sentences:
            ids = MegatronStyleEncoder.tokenize(sentence)
            if len(ids) > 0:
                doc_ids.extend(ids)
                sentence_lens.append(len(ids))
        if len(doc_ids) > 0 and self.eod is not None:
            doc_ids.append(self.eod)
            sentence_lens[-1] += 1
        return doc_ids, sentence_lens, len(json_line)


def baseline_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="preprocess_throughput.py baseline")
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer-json", required=True)
    p.add_argument("--eod", type=int, default=None)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunksize", type=int, default=32)  # Megatron-LM's imap chunksize
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--tokenizer-call", choices=["rust", "transformers"], default="rust")
    args = p.parse_args(argv)
    start = time.perf_counter()
    import multiprocessing

    from megatron.core.datasets import indexed_dataset
    from tokenizers import Tokenizer

    imported = time.perf_counter()
    encoder = MegatronStyleEncoder(args.tokenizer_json, args.eod, call=args.tokenizer_call)
    vocab_size = Tokenizer.from_file(args.tokenizer_json).get_vocab_size(with_added_tokens=True)
    fin = open(args.input, encoding="utf-8")
    pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
    encoded_docs = pool.imap(encoder.encode, fin, args.chunksize)
    builder = indexed_dataset.IndexedDatasetBuilder(
        f"{args.output_prefix}.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab_size)
    )
    total_bytes, count = 0, 0
    for count, (doc, sentence_lens, num_bytes) in enumerate(encoded_docs, start=1):
        total_bytes += num_bytes
        builder.add_document(doc, sentence_lens)
        if count % args.log_interval == 0:
            elapsed = time.perf_counter() - imported
            print(
                f"Processed {count} documents ({count / elapsed:.1f} docs/s, "
                f"{total_bytes / elapsed / 1024 / 1024:.2f} MB/s).",
                file=sys.stderr,
            )
    fin.close()
    builder.finalize(f"{args.output_prefix}.idx")
    pool.close()
    pool.join()
    end = time.perf_counter()
    main_cpu, workers_cpu = (
        _cpu_seconds(resource.RUSAGE_SELF),
        _cpu_seconds(resource.RUSAGE_CHILDREN),
    )
    print(
        json.dumps(
            {
                "documents": count,
                "import_s": imported - start,
                "after_imports_s": end - imported,
                "main_cpu_s": main_cpu,
                "workers_cpu_s": workers_cpu,
            }
        )
    )
    return 0


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------- corpus and tokenizer


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _check_call(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, cwd=REPO, env=_python_env(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(
            f"{what} failed (exit {done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}"
        )


def corpus_path(work: Path, size_mb: float) -> Path:
    """The GIMP corpus repeated to at least `size_mb` MB (cached as corpus/gimp_fi_xK.jsonl)."""
    base = _write_corpus(work / "corpus" / "gimp_fi_x1.jsonl", 1)
    repeat = max(1, math.ceil(size_mb * MB / base.stat().st_size))
    return _write_corpus(work / "corpus" / f"gimp_fi_x{repeat}.jsonl", repeat)


def _write_corpus(path: Path, repeat: int) -> Path:
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        cmd = [
            sys.executable,
            "tools/gimp_help_to_jsonl.py",
            "--output",
            str(path),
            "--repeat",
            str(repeat),
        ]
        _check_call(cmd, "corpus extraction")
    return path


def tokenizer_dir(work: Path) -> Path:
    """Byte-level BPE trained on one copy of the corpus (cached as tokenizer-bpe32k/)."""
    out = work / f"tokenizer-bpe{VOCAB_SIZE // 1000}k"
    if not (out / "tokenizer.json").is_file():
        print(f"training {out} ...", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "megatron_ext",
            "train-tokenizer",
            "--input",
            str(corpus_path(work, 0)),
            "--vocab-size",
            str(VOCAB_SIZE),
            "--output",
            str(out),
            "--overwrite",
            "--no-progress",
        ]
        _check_call(cmd, "tokenizer training")
    return out


# ---------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    seconds: float
    stdout: str
    peak_tree_rss: int = 0
    peak_main_rss: int = 0


def _vm_hwm(pid: int) -> int:
    """The kernel's own peak RSS of one process (bytes), 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_timed(cmd: list[str], log_name: str, work: Path, poll_rss: bool = False) -> Run:
    """Run `cmd` from the repository root; wall clock from launch to exit; exits on failure."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{log_name}.out", logs / f"{log_name}.err"
    peak_tree = peak_main = 0
    with open(out_path, "w") as out, open(err_path, "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=_python_env(), stdout=out, stderr=err)
        if poll_rss:
            import psutil

            root = psutil.Process(proc.pid)
            while proc.poll() is None:
                tree, main = _tree_rss(psutil, root)
                peak_tree = max(peak_tree, tree)
                peak_main = max(peak_main, main, _vm_hwm(proc.pid))
                time.sleep(RSS_POLL_S)
        rc = proc.wait()
        seconds = time.perf_counter() - start
    if rc != 0:
        sys.exit(
            f"{log_name} failed (exit {rc}): {shlex.join(cmd)}\n{err_path.read_text()[-3000:]}"
        )
    return Run(seconds, out_path.read_text(), peak_tree, peak_main)


def _tree_rss(psutil, root) -> tuple[int, int]:
    """(sum of RSS over `root` and its descendants, RSS of `root`) in bytes."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    tree = main = 0
    for proc in procs:
        try:
            rss = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        tree += rss
        main = rss if proc.pid == root.pid else main
    return tree, main


def ours_cmd(corpus: Path, tokenizer: Path, prefix: Path, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "megatron_ext",
        "preprocess",
        "--input",
        str(corpus),
        "--output-prefix",
        str(prefix),
        "--tokenizer",
        str(tokenizer),
        "--workers",
        str(workers),
        "--append-eod",
        "--no-progress",
    ]


def baseline_cmd(
    corpus: Path, tokenizer: Path, prefix: Path, workers: int, call: str = "rust"
) -> list[str]:
    from megatron_ext.data.tokenizer import load_tokenizer

    eod = load_tokenizer(tokenizer).eod_id
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "baseline",
        "--input",
        str(corpus),
        "--tokenizer-json",
        str(tokenizer / "tokenizer.json"),
        "--eod",
        str(eod),
        "--output-prefix",
        str(prefix),
        "--workers",
        str(workers),
        "--tokenizer-call",
        call,
    ]


def first_difference(a: Path, b: Path) -> str | None:
    """None when the files are byte-identical, else where they first differ."""
    size_a, size_b = a.stat().st_size, b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            block_a, block_b = fa.read(1 << 24), fb.read(1 << 24)
            if block_a != block_b:
                n = next(
                    (i for i, (x, y) in enumerate(zip(block_a, block_b, strict=False)) if x != y),
                    None,
                )
                where = offset + (min(len(block_a), len(block_b)) if n is None else n)
                return f"{a} ({size_a} bytes) and {b} ({size_b} bytes) differ at byte {where}"
            if not block_a:
                return None
            offset += len(block_a)


def _limit_worker(tokenizer: str, corpus: str, rank: int, workers: int, go, results) -> None:
    # The thread settings of megatron_ext.data.records.init_worker (one tokenizer thread).
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from megatron_ext.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    batches, batch, size = [], [], 0
    with open(corpus, "rb") as f:
        for i, line in enumerate(f):
            if i % workers == rank:
                batch.append(json.loads(line)["text"])
                size += len(line)
                if size >= BATCH_BYTES:
                    batches.append(batch)
                    batch, size = [], 0
    if batch:
        batches.append(batch)
    results.put(("ready", rank))
    go.wait()
    start = time.perf_counter()
    docs = tokens = 0
    for batch in batches:
        ids = tok.encode_batch(batch)
        docs += len(ids)
        tokens += sum(map(len, ids))
    results.put(("done", rank, docs, tokens, time.perf_counter() - start))


@dataclass
class LimitRun:
    seconds: float
    documents: int
    tokens: int  # without EOD
    per_process_s: list[float]


def run_limit(corpus: Path, tokenizer: Path, workers: int) -> LimitRun:
    import multiprocessing as mp
    import queue

    ctx = mp.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_limit_worker, args=(str(tokenizer), str(corpus), r, workers, go, results)
        )
        for r in range(workers)
    ]
    for proc in procs:
        proc.start()

    def collect(kind: str) -> list[tuple]:
        got = []
        while len(got) < workers:
            try:
                got.append(results.get(timeout=1.0))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    sys.exit("limit: a tokenizer process died; see its traceback above")
        assert all(g[0] == kind for g in got), got
        return sorted(got)

    collect("ready")  # every process holds its texts and a loaded tokenizer
    start = time.perf_counter()
    go.set()
    done = collect("done")
    seconds = time.perf_counter() - start
    for proc in procs:
        proc.join()
    docs, tokens = sum(d[2] for d in done), sum(d[3] for d in done)
    return LimitRun(seconds, docs, tokens, [d[4] for d in done])


# ---------------------------------------------------------------------------------- reporting


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"nproc {nproc}, {cpu}, {mem:.0f} GiB RAM"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {sys.version.split()[0]}"]
    for pkg in ("tokenizers", "megatron-core", "numpy"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return ", ".join(parts) + (f", commit {commit}" if commit else "")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FALL SHORT"


def report(
    args, corpus, docs, tokens, ours, base, base_hf, base_inner_s, limit, rss
) -> tuple[str, str]:
    """(console text, markdown) of the results."""
    size = corpus.stat().st_size
    rows = [
        ("ours (megatron-ext preprocess)", ours.seconds),
        ("baseline A (Megatron-LM, transformers tokenizer call)", base_hf.seconds),
        ("baseline B (Megatron-LM pipeline, raw Rust encode)", base.seconds),
        ("limit (tokenizer alone)", limit.seconds),
    ]
    table = ["| | wall s | docs/s | MB/s | tokens/s |", "|---|---:|---:|---:|---:|"]
    for name, s in rows:
        table.append(
            f"| {name} | {s:.2f} | {docs / s:,.0f} | {size / MB / s:.2f} | {tokens / s:,.0f} |"
        )
    r1, r2 = base_hf.seconds / ours.seconds, limit.seconds / ours.seconds
    r1b = base.seconds / ours.seconds
    ratios = [
        "| figure | value | target | |",
        "|---|---:|---:|---|",
        f"| 1. ours / baseline A, docs/s (outputs byte-identical) | {r1:.2f}x | >= 1.50x "
        f"| {verdict(r1 >= 1.5)} |",
        f"| 1b. ours / baseline B, docs/s (outputs byte-identical) | {r1b:.2f}x | >= 1.50x "
        f"| {verdict(r1b >= 1.5)} |",
        f"| 2. ours / limit, docs/s | {r2:.1%} | >= 85% | {verdict(r2 >= 0.85)} |",
    ]
    notes = [
        f"baseline without its interpreter start and imports: {base_inner_s:.2f} s "
        f"(ours / that: {base_inner_s / ours.seconds:.2f}x)",
        "limit per process (s): " + ", ".join(f"{s:.2f}" for s in limit.per_process_s),
    ]
    if rss:
        trees = [r.peak_tree_rss for r in rss.values()]
        r3 = max(trees) / min(trees)
        sizes = "/".join(f"{mb:g} MB" for mb in rss)
        ratios.append(
            f"| 3. peak RSS (process tree), largest / smallest over {sizes} | {r3:.3f} "
            f"| <= 1.10 | {verdict(r3 <= 1.10)} |"
        )
        for mb, r in rss.items():
            notes.append(
                f"peak RSS at {mb:g} MB: tree {r.peak_tree_rss / 2**20:,.0f} MiB, "
                f"main process {r.peak_main_rss / 2**20:,.0f} MiB ({r.seconds:.1f} s)"
            )
    head = (
        f"corpus {corpus.name}: {size / MB:.1f} MB, {docs:,} documents, {tokens:,} tokens "
        f"(EOD included; the same counts for every row); {args.workers} workers; "
        f"best of {args.repeats}"
    )
    timed = "What is timed (wall clock):" + __doc__.split("What is timed (wall clock):")[1]
    console = "\n".join([head, "", *table, "", *ratios, "", *notes, "", timed.strip()])
    md = "\n".join(
        [
            "# Preprocessing throughput",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
            f"- machine: {machine()}",
            f"- software: {versions()}",
            f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
            f"- {head}",
            "",
            *table,
            "",
            *ratios,
            "",
            *(f"- {n}" for n in notes),
            "",
            "## Definitions",
            "",
            timed.strip(),
            "",
        ]
    )
    return console, md


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--size-mb", type=float, default=200, help="throughput corpus size (default: 200)"
    )
    p.add_argument(
        "--rss-sizes-mb", default="200,1000", help="corpus sizes for peak RSS (default: 200,1000)"
    )
    p.add_argument("--workers", type=int, default=2, help="processes on every side (default: 2)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side; the fastest counts")
    p.add_argument("--skip-rss", action="store_true", help="no peak-RSS runs")
    p.add_argument(
        "--work-dir",
        default=str(REPO / "benchmarks" / "work"),
        help="corpus, tokenizer, outputs, logs (default: benchmarks/work)",
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep the .bin/.idx files written")
    p.add_argument("--record", metavar="FILE.md", help="write the results as markdown here")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["baseline"]:
        return baseline_main(argv[1:])
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from megatron_ext.data.indexed_dataset import IndexedDataset

    work = Path(args.work_dir).resolve()
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_path(work, args.size_mb)
    tokenizer = tokenizer_dir(work)
    subprocess.run(["cat", str(corpus)], stdout=subprocess.DEVNULL, check=True)  # page cache
    ours_prefix, base_prefix = out / "ours", out / "baseline"
    ours = base = base_hf = limit = None
    base_inner_s = math.inf
    for i in range(args.repeats):
        print(f"run {i + 1}/{args.repeats}: ours, baseline, limit on {corpus.name} ...", flush=True)
        o = run_timed(ours_cmd(corpus, tokenizer, ours_prefix, args.workers), "ours", work)
        b = run_timed(baseline_cmd(corpus, tokenizer, base_prefix, args.workers), "baseline", work)
        for ext in (".bin", ".idx"):
            diff = first_difference(Path(f"{ours_prefix}{ext}"), Path(f"{base_prefix}{ext}"))
            if diff:
                sys.exit(f"FAIL: outputs are not byte-identical: {diff}")
        cmd = baseline_cmd(corpus, tokenizer, base_prefix, args.workers, call="transformers")
        bh = run_timed(cmd, "baseline-transformers", work)
        for ext in (".bin", ".idx"):
            diff = first_difference(Path(f"{ours_prefix}{ext}"), Path(f"{base_prefix}{ext}"))
            if diff:
                sys.exit(f"FAIL: outputs are not byte-identical: {diff}")
        base_hf = bh if base_hf is None or bh.seconds < base_hf.seconds else base_hf
        lim = run_limit(corpus, tokenizer, args.workers)
        ours = o if ours is None or o.seconds < ours.seconds else ours
        base = b if base is None or b.seconds < base.seconds else base
        limit = lim if limit is None or lim.seconds < limit.seconds else limit
        base_inner_s = min(
            base_inner_s, json.loads(b.stdout.strip().splitlines()[-1])["after_imports_s"]
        )
    ds = IndexedDataset(ours_prefix)
    docs, tokens = ds.num_documents, ds.num_tokens
    del ds
    if (limit.documents, limit.tokens + limit.documents) != (docs, tokens):
        sys.exit(
            f"FAIL: the limit encoded {limit.documents} documents, {limit.tokens} tokens + EOD; "
            f"the outputs hold {docs} documents, {tokens} tokens: not the same work"
        )
    print(f"outputs byte-identical: {ours_prefix}.bin/.idx == {base_prefix}.bin/.idx")

    rss = {}
    if not args.skip_rss:
        for mb in sorted(float(s) for s in args.rss_sizes_mb.split(",")):
            path = corpus_path(work, mb)
            print(f"peak RSS: ours on {path.name} ...", flush=True)
            cmd = ours_cmd(path, tokenizer, out / "rss", args.workers)
            rss[mb] = run_timed(cmd, f"rss-{mb:g}MB", work, poll_rss=True)
    if not args.keep_outputs:
        for prefix in (ours_prefix, base_prefix, out / "rss"):
            for ext in (".bin", ".idx"):
                Path(f"{prefix}{ext}").unlink(missing_ok=True)

    console, md = report(args, corpus, docs, tokens, ours, base, base_hf, base_inner_s, limit, rss)
    print("\n" + console)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(md)
        print(f"\nwrote {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
