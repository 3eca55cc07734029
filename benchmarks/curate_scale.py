"""`megatron-ext curate` at scale (issue 20): throughput per step and for the whole pipeline, and
peak memory at two corpus sizes.

    python benchmarks/curate_scale.py [--sizes 200,1000] [--workers-scaling 2] [--record FILE]

Corpus (1 MB = 10^6 bytes of JSONL), deterministic for a given `--seed`: the pages of the
Finnish GIMP manual (Debian `gimp-help-fi`, `iter_html_documents`) whose Finnish share is at
least `--min-finnish` (default 0.5: 201 of the 663 pages, 0.44 MB of text; the manual is partly
untranslated English) are the seed pool. Documents are drawn one at
a time, each from the pool (the manual's pages and a reservoir of `RESERVOIR` documents already
written), as one of (shares in `KINDS`: exact 0.5, near 0.3, unique 0.2):
- exact: an identical copy;
- near: `variant` of benchmarks/curate_neardup.py (adjacent words swapped, sentences dropped, or
  sentences of another document added); many of these are near-duplicates by the config's
  threshold (estimated Jaccard >= 0.8 on word 5-grams), the heavier edits are not;
- unique: 8-40 sentences drawn from 2-4 manual pages, shuffled, `SUBSTITUTE` of their words
  replaced by random words of the manual, in paragraphs of 2-5 sentences.
Near and unique documents join the reservoir (a random slot once full), so later copies repeat
them. Each record is `{"id", "text", "kind"}`. Files of about 32 MB (`--sizes`' smallest split
evenly) are written until each size is reached; a larger size's corpus is a superset of a
smaller one's (the same first files). curate parallelises over input files (never split).

Each run is the real CLI in a fresh subprocess, default config, one thread per process
(`RAYON_NUM_THREADS`, `OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS` = 1: rensa
and py3langid's numpy would otherwise use more cores than the unit's one):
`python -m megatron_ext curate --input FILES... --output OUT --workers W`. Measured: wall time
(launch to exit, interpreter start and imports included), the peak RSS of the largest process
(the kernel's ru_maxrss of the child and the descendants it waited for, `os.wait4`), and, polled
every `POLL_S` s: the summed RSS of the process tree (psutil), attributed to the phase running
then (from the done markers in OUT.work; a sample taken while the phase changed counts only for
the tree's peak), and the disk use of OUT.work; and the machine's load average at the end. From report.json: the
documents, removals by step and `step_seconds` (seconds summed over all units: one core each).
MB/s per core: input MB / step seconds for a step, input MB / (wall seconds x processes) for the
whole pipeline; on a shared machine these include waiting for a core, so the whole pipeline's
CPU seconds (user + system, os.wait4) and their share of wall x processes are given too. The
memory bound: peak RSS (ru_maxrss) with `--workers 1` at the largest size
within 20% of that at the smallest (issue 20: 1 GB vs 200 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # megatron_ext, uninstalled

from common import ROOT, finish  # noqa: E402
from curate_neardup import variant  # noqa: E402

from megatron_ext.demo.gimp_corpus import (  # noqa: E402
    DEFAULT_INPUT_DIR,
    HtmlCorpusConfig,
    iter_html_documents,
)

MB = 10**6
MIB = 2**20
KINDS = {"exact": 0.5, "near": 0.3, "unique": 0.2}  # shares of the documents drawn
RESERVOIR = 5000
SUBSTITUTE = 0.15
POLL_S = 0.5
# one thread per process: rensa (Rayon), and numpy's BLAS in py3langid's classifier
ONE_THREAD = {k: "1" for k in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                               "MKL_NUM_THREADS")}  # fmt: skip
PHASES = ("scan", "exact", "judge", "near", "cluster", "final")
STEP_ORDER = ("read", "normalise", "exact_dedup", "boilerplate", "near_dedup", "quality",
              "language", "pii", "decontaminate", "write", "other")  # fmt: skip
REMOVAL_ORDER = ("exact_dedup", "boilerplate", "near_dedup", "quality", "language",
                 "decontaminate")  # fmt: skip
_SENTENCE = re.compile(r"(?<=[.!?:])\s+")

# ---------------------------------------------------------------- corpus


class Generator:
    """Documents drawn from the manual's pages and earlier documents (see the docstring)."""

    def __init__(self, pages: list[str], seed: int):
        self.rng = random.Random(seed)
        self.pages = pages
        self.sentences = [[s for s in _SENTENCE.split(p.replace("\n", " ")) if s.strip()]
                          for p in pages]  # fmt: skip
        self.vocab = sorted({w for p in pages for w in p.split() if w.isalpha()})
        self.reservoir: list[str] = []
        self.seen = 0

    def pick(self) -> str:
        k = self.rng.randrange(len(self.pages) + len(self.reservoir))
        return self.pages[k] if k < len(self.pages) else self.reservoir[k - len(self.pages)]

    def unique(self) -> str:
        rng = self.rng
        pool = [s for i in rng.sample(range(len(self.pages)), rng.randint(2, 4))
                for s in self.sentences[i]]  # fmt: skip
        chosen = rng.sample(pool, min(len(pool), rng.randint(8, 40)))
        out = []
        for s in chosen:
            ws = s.split()
            for i in range(len(ws)):
                if rng.random() < SUBSTITUTE:
                    ws[i] = rng.choice(self.vocab)
            out.append(" ".join(ws))
        paras, i = [], 0
        while i < len(out):
            n = rng.randint(2, 5)
            paras.append(" ".join(out[i : i + n]))
            i += n
        return "\n\n".join(paras)

    def remember(self, doc: str) -> None:
        self.seen += 1
        if len(self.reservoir) < RESERVOIR:
            self.reservoir.append(doc)
        else:
            self.reservoir[self.rng.randrange(RESERVOIR)] = doc

    def next(self) -> tuple[str, str]:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if kind == "exact":
            return kind, self.pick()
        if kind == "near":
            base = self.pick()
            while len(base.split()) < 2:  # variant swaps words: a one-word text has no pair
                base = self.pick()
            doc = variant(base, self.pick(), self.rng)
        else:
            doc = self.unique()
        self.remember(doc)
        return kind, doc


def build_corpus(
    work: Path, sizes: list[int], seed: int, input_dir: str, min_finnish: float
) -> list[dict]:
    """The corpus files under WORK/corpus (reused when WORK/corpus/manifest.json matches):
    [{"name", "bytes", "documents", "kinds"}] in order."""
    corpus = work / "corpus"
    smallest = min(sizes)
    file_mb = smallest / max(1, round(smallest / 32))
    n_files = max(round(s / file_mb) for s in sizes)
    params = {"seed": seed, "file_mb": file_mb, "input_dir": input_dir, "min_finnish": min_finnish, "kinds": KINDS,
              "reservoir": RESERVOIR, "substitute": SUBSTITUTE}  # fmt: skip
    manifest = corpus / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old["params"] == params and len(old["files"]) >= n_files:
            print(f"reusing the corpus in {corpus}", file=sys.stderr)
            return old["files"]
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.mkdir(parents=True)
    config = HtmlCorpusConfig(input_dir=input_dir, min_finnish=min_finnish)
    pages = [d["text"] for d in iter_html_documents(config)]
    gen, files, n = Generator(pages, seed), [], 0
    started = time.perf_counter()
    for i in range(n_files):
        name, size, kinds = f"fi-{i:04d}.jsonl", 0, Counter()
        with open(corpus / name, "w", encoding="utf-8") as f:
            while size < file_mb * MB:
                kind, text = gen.next()
                line = json.dumps({"id": f"doc-{n:09d}", "text": text, "kind": kind},
                                  ensure_ascii=False) + "\n"  # fmt: skip
                f.write(line)
                size += len(line.encode())
                kinds[kind] += 1
                n += 1
        files.append({"name": name, "bytes": size, "documents": sum(kinds.values()),
                      "kinds": dict(kinds)})  # fmt: skip
        print(f"corpus: {name} {size / MB:.1f} MB ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)  # fmt: skip
    manifest.write_text(json.dumps({"params": params, "files": files}, indent=1))
    return files


# ---------------------------------------------------------------- runs


@dataclass
class Result:
    size_mb: int
    workers: int
    wall: float
    maxrss: int  # bytes: the largest process (ru_maxrss)
    cpu: float  # user + system seconds of the process tree (os.wait4)
    report: dict
    kinds: Counter
    files: int = 0
    tree_rss: int = 0  # bytes: the largest polled sum over the process tree
    phase_rss: dict = field(default_factory=dict)  # phase: largest polled tree sum
    work_peak: int = 0  # bytes: the largest polled disk use of OUT.work
    load: float = 0.0  # the machine's 5-minute load average at the end

    @property
    def mb(self) -> float:
        return self.report["input_bytes"] / MB


def _disk_use(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def _phase(work: Path, plan: dict | None, last: str) -> str:
    """The phase running now: the first with units not done; LAST: the one found before."""
    if plan is None:
        return "plan"
    parts, buckets = len(plan["parts"]), plan["buckets"]
    units = {"scan": parts, "exact": buckets, "judge": parts, "near": buckets, "cluster": 1,
             "final": parts}  # fmt: skip
    try:
        done = Counter(n.split(".")[0] for n in os.listdir(work / "done"))
    except OSError:  # not made yet, or removed at the end (after the output is written)
        return "plan" if last == "plan" else "assemble"
    for phase in PHASES:
        if done[phase] < units[phase]:
            return phase
    return "assemble"


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def run_curate(files: list[Path], out: Path, workers: int, log: Path) -> Result:
    """One CLI run in a fresh subprocess, with its measurements (report not yet attached)."""
    import psutil

    cmd = [sys.executable, "-m", "megatron_ext", "curate", "--input", *map(str, files),
           "--output", str(out), "--workers", str(workers)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    work = out.with_name(out.name + ".work")
    result = Result(0, workers, 0.0, 0, 0.0, {}, Counter())
    plan, last = None, "plan"
    with open(log, "w") as f:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        proc = psutil.Process(child.pid)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid == child.pid:
                break
            if plan is None and (work / "plan.json").exists():
                plan = json.loads((work / "plan.json").read_text())
            before = _phase(work, plan, last)
            rss = _tree_rss(proc)
            result.tree_rss = max(result.tree_rss, rss)
            last = _phase(work, plan, before)
            if last == before:  # else the sample may be either phase's
                result.phase_rss[before] = max(result.phase_rss.get(before, 0), rss)
            if work.exists():
                result.work_peak = max(result.work_peak, _disk_use(work))
            time.sleep(POLL_S)
        result.wall = time.perf_counter() - started
    result.load = os.getloadavg()[1]
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"curate failed (exit {child.returncode}); {log}:\n{tail}")
    result.maxrss = usage.ru_maxrss * 1024
    result.cpu = usage.ru_utime + usage.ru_stime
    result.report = json.loads((out / "report.json").read_text())
    return result


# ---------------------------------------------------------------- report


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f}"


def tables(results: list[Result], kinds_note: list[str]) -> list[str]:
    lines = [*kinds_note, ""]
    head = [f"{r.size_mb} MB, {r.workers} worker{'s' if r.workers > 1 else ''}" for r in results]
    lines += ["Whole pipeline (wall: launch to exit, start-up and writing the output included):", "",
              "| run | input MB | documents | kept | wall s | processes | wall MB/s "
              "| MB/s per core | CPU s | CPU share | MB per CPU s "
              "| peak RSS MiB (largest process) | peak RSS MiB (tree, polled) | peak OUT.work MB "
              "| load avg (5 min) at end |",
              "|---|" + "---:|" * 14]  # fmt: skip
    for h, r in zip(head, results, strict=True):
        rep = r.report
        lines.append(
            f"| {h} | {r.mb:,.1f} | {rep['documents']:,} | {rep['kept']:,} | {r.wall:,.1f} "
            f"| {rep['processes']} | {r.mb / r.wall:.2f} | {r.mb / (r.wall * rep['processes']):.2f} "
            f"| {r.cpu:,.1f} | {r.cpu / (r.wall * rep['processes']):.0%} | {r.mb / r.cpu:.2f} "
            f"| {_mib(r.maxrss)} | {_mib(r.tree_rss)} | {r.work_peak / MB:,.0f} | {r.load:.1f} |"
        )
    lines += ["", "Per step (`step_seconds` of report.json, summed over units, each on one core): "
              "seconds, and input MB / seconds = MB/s per core:", "",
              "| step | " + " | ".join(head) + " |",
              "|---|" + "---:|" * len(results)]  # fmt: skip
    steps = [s for s in STEP_ORDER if any(s in r.report["step_seconds"] for r in results)]
    steps += sorted({s for r in results for s in r.report["step_seconds"]} - set(steps))
    for s in [*steps, "sum"]:
        cells = []
        for r in results:
            sec = r.report["step_seconds"]
            t = sum(sec.values()) if s == "sum" else sec.get(s)
            cells.append("-" if t is None else f"{t:,.1f} s, {r.mb / t:,.2f}" if t else "0 s")
        lines.append(f"| {'**sum of steps**' if s == 'sum' else s} | " + " | ".join(cells) + " |")
    lines.append("| wall x processes | " + " | ".join(
        f"{r.wall * r.report['processes']:,.1f} s, {r.mb / (r.wall * r.report['processes']):.2f}"
        for r in results) + " |")  # fmt: skip
    lines += ["", "Documents: read, removed by each step, kept:", "",
              "| documents | " + " | ".join(head) + " |",
              "|---|" + "---:|" * len(results)]  # fmt: skip
    rows = [("read", [r.report["documents"] for r in results])]
    for s in REMOVAL_ORDER:
        rows.append((f"removed: {s}", [r.report["removed_by_step"].get(s, 0) for r in results]))
    rows.append(("kept", [r.report["kept"] for r in results]))
    rows.append(("kept after dedup (share of read)", [
        f"{(r.report['documents'] - sum(r.report['removed_by_step'].get(s, 0) for s in REMOVAL_ORDER[:3])) / r.report['documents']:.1%}"  # noqa: E501
        for r in results]))  # fmt: skip
    for name, vals in rows:
        lines.append(f"| {name} | " + " | ".join(
            v if isinstance(v, str) else f"{v:,}" for v in vals) + " |")  # fmt: skip
    phases = ["plan", *PHASES, "assemble"]
    lines += ["", "Peak RSS of the process tree by phase (MiB, polled every "
              f"{POLL_S} s, so short peaks may be missed):", "",
              "| phase | " + " | ".join(head) + " |", "|---|" + "---:|" * len(results)]  # fmt: skip
    for ph in phases:
        label = "after the phases (output written, OUT.work removed)" if ph == "assemble" else ph
        lines.append(f"| {label} | " + " | ".join(
            _mib(r.phase_rss[ph]) if ph in r.phase_rss else "-" for r in results) + " |")  # fmt: skip
    single = [r for r in results if r.workers == 1]
    if len(single) >= 2:
        lo = min(single, key=lambda r: r.size_mb)
        hi = max(single, key=lambda r: r.size_mb)
        ratio = hi.maxrss / lo.maxrss
        verdict = "PASS" if ratio <= 1.20 else "FAIL"
        lines += ["", f"Memory bound (`--workers 1`, ru_maxrss): {_mib(hi.maxrss)} MiB at "
                  f"{hi.size_mb} MB / {_mib(lo.maxrss)} MiB at {lo.size_mb} MB = **{ratio:.3f}** "
                  f"(bound 1.20: {verdict})."]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="200,1000", help="corpus sizes in MB (default %(default)s)")
    p.add_argument("--workers-scaling", type=int, default=2,
                   help="also run the smallest size with this many workers (0: skip)")  # fmt: skip
    p.add_argument("--input-dir", default=DEFAULT_INPUT_DIR)
    p.add_argument("--min-finnish", type=float, default=0.5,
                   help="manual pages kept: Finnish share at least this (default %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default: a temp dir under /tmp")
    p.add_argument("--keep", action="store_true", help="keep the work dir (corpus, outputs)")
    p.add_argument("--record", default=None)
    args = p.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="curate_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = build_corpus(work, sizes, args.seed, args.input_dir, args.min_finnish)
        file_mb = files[0]["bytes"] / MB
        runs = [(s, 1) for s in sizes]
        if args.workers_scaling > 1:
            runs.insert(1, (sizes[0], args.workers_scaling))
        results = []
        for size, workers in runs:
            chosen = files[: round(size / file_mb)]
            out = work / "runs" / f"{size}mb-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".work"), ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            print(f"run: {size} MB ({len(chosen)} files), --workers {workers}", file=sys.stderr)
            r = run_curate([work / "corpus" / f["name"] for f in chosen], out, workers,
                           out.with_name(out.name + ".log"))  # fmt: skip
            r.size_mb, r.files = size, len(chosen)
            for f in chosen:
                r.kinds.update(f["kinds"])
            print(f"  {r.wall:.1f} s, ru_maxrss {_mib(r.maxrss)} MiB", file=sys.stderr)
            results.append(r)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        kinds_note = [
            f"Corpus at {r.size_mb} MB: {r.files} files of ~{file_mb:.1f} MB, {sum(r.kinds.values()):,} documents drawn as "
            + ", ".join(f"{k} {v:,}" for k, v in sorted(r.kinds.items()))
            for r in results if r.workers == 1
        ]  # fmt: skip
        finish(tables(results, kinds_note), "curate_scale.py", args.record, argv)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
