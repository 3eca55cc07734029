"""`megatron-ext curate`: the steps in order over a corpus, kept documents as JSONL shards, removed
ones with their reason, and a report.

Order: normalise -> exact document dedup -> boilerplate lines -> near-duplicates -> quality ->
language -> PII masking -> decontamination. Output (written under DIR.tmp-*, renamed to DIR at
the end: an interrupted run leaves nothing under the final name):

    DIR/kept/shard-00000.jsonl ...   kept documents, input order, their other fields kept
    DIR/removed/removed.jsonl        {"id", "source", "line", "step", "reason", "matched"}
    DIR/report.json, report.md, report.png   documents and characters per step and per source

Scale: the work runs in phases over units (`work.Work`) in DIR.work, on one node's `--workers`
processes or on several nodes (`srun`/`mpirun`), and survives interruption (run the command
again). Memory is bounded by the config, not by the corpus:
- input parts (`part_mb` of input files each) are read one document at a time into spill files;
- exact and line hashes and the MinHash band keys are written to hash buckets (one per
  `bucket_mb` of input), each bucket sorted on its own;
- candidate pairs are verified with signatures read from disk in batches;
- duplicates (exact and near) are filed per input part, so a part's unit reads only its own;
- what the whole corpus shares is small: the hashes of boilerplate lines, about 40 bytes per
  duplicate document in the cluster step, and the ids of duplicated documents while removed/
  is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from array import array
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_ext.curate import dedup, text
from megatron_ext.curate.config import CurateConfig
from megatron_ext.curate.work import (
    RecordWriter,
    Work,
    load_arrays,
    ranks,
    read_records,
    save_array,
    write_atomic,
)
from megatron_ext.data.inputs import check_inputs, expand_inputs, iter_chunks, split_contiguous
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

STEPS = ("read", "exact_dedup", "boilerplate", "near_dedup", "quality", "language", "decontaminate")
LINE_MASK = (1 << dedup.LINE_BITS) - 1
SIGNATURE_BATCH = 1 << 16  # signatures read at once when verifying candidates (32 MB at 128)


@dataclass
class Run:
    """What every unit needs: the work directory, the plan and the config."""

    root: str
    plan: dict
    cfg: CurateConfig

    def path(self, *parts) -> Path:
        return Path(self.root).joinpath(*map(str, parts))

    def source(self, g: int) -> tuple[str, int]:
        return self.plan["inputs"][g >> dedup.LINE_BITS], g & LINE_MASK

    def where(self, g: int) -> str:
        path, line = self.source(g)
        return f"{path}:{line}"

    def parts_of(self, gs: np.ndarray) -> np.ndarray:
        """The input part of each document key of GS."""
        part_of_file = np.zeros(len(self.plan["inputs"]), dtype=np.int64)
        for p, files in enumerate(self.plan["parts"]):
            part_of_file[files] = p
        return part_of_file[(gs >> np.uint64(dedup.LINE_BITS)).astype(np.int64)]

    def save_by_part(self, rows: np.ndarray, phase: str, name: str) -> None:
        """ROWS (first column: a document key) as one file per input part, PHASE/NAME-PART.npy,
        so a part's unit reads only its own."""
        parts = self.parts_of(rows[:, 0])
        for p in range(len(self.plan["parts"])):
            save_array(self.path(phase, f"{name}-{p}.npy"), rows[parts == p])


class Timer:
    """Seconds spent per step in one unit, saved for the report."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] += now - self.last
        self.last = now

    def save(self, run: Run, phase: str, unit: int) -> None:
        self.lap("other")
        write_atomic(run.path("times", f"{phase}.{unit}.json"), json.dumps(self.seconds).encode())


WORK_FORMAT = 2  # the layout of the work directory's files (a resume across versions starts over)


def make_plan(inputs: list[str], out: Path, cfg: CurateConfig, strict: bool) -> dict:
    """What a run does: its inputs (with sizes and times), parts, buckets, config and evaluation
    data. The same plan in the work directory is resumed; another one starts over."""
    import megatron_ext

    for spec in inputs:
        if Path(spec).is_dir() and out.resolve().is_relative_to(Path(spec).resolve()):
            raise UserError(
                f"--output {out} lies inside the input directory {spec}: its files would be "
                "read as input; give an output directory elsewhere"
            )
    paths = expand_inputs(inputs)
    total = check_inputs(paths)
    if len(paths) >= 1 << (63 - dedup.LINE_BITS):
        raise UserError(f"{len(paths)} input files: too many (merge some)")
    n_parts = min(len(paths), max(1, math.ceil(total / (cfg.part_mb * 2**20))))
    index = {p: i for i, p in enumerate(paths)}
    parts = [[index[p] for p in group] for group in split_contiguous(paths, n_parts) if group]
    stats = [os.stat(p) for p in paths]
    tasks = []
    if cfg.decontaminate.enabled:
        for d in _task_dirs(cfg):
            tasks += [[str(f), f.stat().st_size, f.stat().st_mtime_ns]
                      for f in sorted(Path(d).rglob("*")) if f.is_file()]  # fmt: skip
    return {
        "format": WORK_FORMAT,
        "version": megatron_ext.__version__,
        "inputs": paths,
        "input_files": [[st.st_size, st.st_mtime_ns] for st in stats],
        "task_files": tasks,
        "input_bytes": total,
        "parts": parts,
        "buckets": max(1, math.ceil(total / (cfg.bucket_mb * 2**20))),
        "strict": strict,
        "config": asdict(cfg),
    }


def curate(
    inputs: list[str], output: str, cfg: CurateConfig, workers: int = 1, strict: bool = False
) -> dict | None:
    """Curate INPUTS into OUTPUT; the report (None on ranks other than 0 of a multi-node run)."""
    out = Path(output)
    if out.exists():
        raise UserError(f"{out} exists: give a new --output directory (nothing was written)")
    started = time.perf_counter()
    rank, world, attempt = ranks()
    work = Work(out.with_name(out.name + ".work"), rank, world, workers, attempt)
    try:
        return _curate(work, inputs, out, cfg, strict, started)
    except BaseException as exc:
        work.fail(exc)
        raise


def _curate(
    work: Work, inputs: list[str], out: Path, cfg: CurateConfig, strict: bool, started: float
) -> dict | None:
    plan = make_plan(inputs, out, cfg, strict)
    if work.rank == 0:  # left by an attempt stopped while writing the output
        for old in out.parent.glob(f"{out.name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
    work.agree_on_plan(plan)
    run = Run(str(work.root), plan, cfg)
    parts, buckets = range(len(plan["parts"])), range(plan["buckets"])
    work.run_phase("scan", parts, _scan, run)
    read = [json.loads(run.path("scan", p, "read.json").read_text()) for p in parts]
    if not sum(r["documents"] for r in read):
        raise UserError(f"{', '.join(inputs)}: no document to curate (the work is in {work.root})")
    work.run_phase("exact", buckets, _exact, run)
    work.run_phase("judge", parts, _judge, run)
    work.run_phase("near", buckets, _near, run)
    work.run_phase("cluster", [0], _cluster, run)
    work.run_phase("final", parts, _final, run)
    work.end()
    if work.rank != 0:
        return None
    report = _report(run, time.perf_counter() - started, work.world * work.workers)
    report["ranks"] = work.rank_records()
    _assemble(run, out, report)
    work.finish()
    return report


# ---------------------------------------------------------------- phases (one unit each)


def _scan(run: Run, part: int) -> None:
    """Read part PART's documents, normalise them, spill them to disk, and bucket the hashes of
    their texts (exact duplicates) and of their lines (boilerplate)."""
    cfg, timer = run.cfg, Timer()
    docs = RecordWriter(run.path("scan", part, "docs.pkl"))
    ids = RecordWriter(run.path("scan", part, "ids.pkl"))  # for the report of duplicates
    exact, lines = array("Q"), array("Q")
    skipped: Counter = Counter()
    for f in run.plan["parts"][part]:
        path = run.plan["inputs"][f]
        for chunk in iter_chunks([path]):
            for line, record in _records(chunk, cfg.text_key):
                if isinstance(record, str):
                    if run.plan["strict"]:
                        raise UserError(f"{path}:{line}: {record} (--strict)")
                    skipped[record] += 1
                    continue
                body = record[cfg.text_key]
                record[cfg.text_key] = None  # the text is kept beside; its key keeps its place
                if line > LINE_MASK:
                    raise UserError(f"{path}:{line}: more than {LINE_MASK} lines in one file; "
                                    "split it")  # fmt: skip
                g = f << dedup.LINE_BITS | line
                timer.lap("read")
                normal = text.normalise(body, cfg.normalise) if cfg.normalise.enabled else body
                timer.lap("normalise")
                docs.write((g, record, len(body), normal))
                if record.get(cfg.id_key) is not None:
                    ids.write((g, str(record[cfg.id_key])))
                d = dedup.digest(normal)
                exact.extend((d, g))
                if cfg.exact_dedup.lines:
                    for h in dedup.line_hashes(normal, cfg.exact_dedup.min_line_chars):
                        lines.extend((h, d))
                timer.lap("exact_dedup")
    docs.close()
    ids.close()
    _save_buckets(run, "scan", part, "exact", np.frombuffer(exact, np.uint64).reshape(-1, 2))
    _save_buckets(run, "scan", part, "lines", np.frombuffer(lines, np.uint64).reshape(-1, 2))
    read = {"documents": len(exact) // 2, "skipped": skipped}
    write_atomic(run.path("scan", part, "read.json"), json.dumps(read).encode())
    timer.save(run, "scan", part)


def _save_buckets(run: Run, phase: str, part: int, name: str, rows: np.ndarray, col: int = 0):
    bucket = rows[:, col] % np.uint64(run.plan["buckets"])
    for b in range(run.plan["buckets"]):
        save_array(run.path(phase, part, f"{name}-{b}.npy"), rows[bucket == b])


def _bucket_outputs(run: Run, phase: str, name: str) -> list[Path]:
    """Every bucket's file NAME of PHASE (listed, not globbed: a missing one is an error)."""
    return [run.path(phase, f"{name}-{b}.npy") for b in range(run.plan["buckets"])]


def _bucket_files(run: Run, phase: str, name: str, bucket: int) -> list[Path]:
    return [run.path(phase, p, f"{name}-{bucket}.npy") for p in range(len(run.plan["parts"]))]


def _exact(run: Run, bucket: int) -> None:
    """Bucket BUCKET's exact duplicates (document, the first with its text) and boilerplate
    lines (in more than `max_line_documents` distinct texts)."""
    e, timer = run.cfg.exact_dedup, Timer()
    rows = load_arrays(_bucket_files(run, "scan", "exact", bucket), 2)  # (digest, document)
    dups = np.zeros((0, 2), dtype=np.uint64)
    if e.enabled and len(rows):
        rows = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
        first = np.ones(len(rows), dtype=bool)
        first[1:] = rows[1:, 0] != rows[:-1, 0]
        kept = rows[np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0)), 1]
        dups = np.stack([rows[~first, 1], kept[~first]], axis=1)
    run.save_by_part(dups, "exact", f"dups-{bucket}")
    timer.lap("exact_dedup")
    lines = load_arrays(_bucket_files(run, "scan", "lines", bucket), 2)  # (line, text digest)
    boilerplate = np.zeros(0, dtype=np.uint64)
    if e.enabled and e.lines and len(lines):
        lines = lines[np.lexsort((lines[:, 1], lines[:, 0]))]
        new = np.ones(len(lines), dtype=bool)
        new[1:] = (lines[1:, 0] != lines[:-1, 0]) | (lines[1:, 1] != lines[:-1, 1])
        hashes, counts = np.unique(lines[new, 0], return_counts=True)
        boilerplate = hashes[counts > e.max_line_documents]
    save_array(run.path("exact", f"boilerplate-{bucket}.npy"), boilerplate)
    timer.lap("boilerplate")
    timer.save(run, "exact", bucket)


def _judge(run: Run, part: int) -> None:
    """Part PART's documents with their exact duplicates and boilerplate lines removed, judged by
    the quality rules and the language score, and their MinHash band keys bucketed."""
    cfg, timer = run.cfg, Timer()
    dups = [run.path("exact", f"dups-{b}-{part}.npy") for b in range(run.plan["buckets"])]
    exact = dict(load_arrays(dups, 2).tolist())
    boilerplate = load_arrays(_bucket_outputs(run, "exact", "boilerplate"), 1)
    boilerplate = set(boilerplate.ravel().tolist())
    judged = RecordWriter(run.path("judge", part, "docs.pkl"))
    signatures, keys = [], []
    timer.lap("other")
    for g, record, raw_chars, body in read_records(run.path("scan", part, "docs.pkl")):
        normal_chars, fate, quality, language, mixed = len(body), None, None, None, False
        if g in exact:
            fate = ("exact_dedup", "identical text", exact[g])
        elif boilerplate:
            e = cfg.exact_dedup
            body, dropped = dedup.drop_lines(body, boilerplate, e.min_line_chars)
            if dropped and len(body.strip()) < e.min_kept_fraction * normal_chars:
                fate = ("boilerplate", f"{dropped} boilerplate lines left too little text", None)
        timer.lap("boilerplate")
        if fate is None:
            if cfg.near_dedup.enabled:
                signatures.append(dedup.signature(body, cfg.near_dedup))
                keys.append(g)
                timer.lap("near_dedup")
            if cfg.quality.enabled:
                quality = text.quality_problem(body, cfg.quality)
                timer.lap("quality")
            if cfg.language.enabled:
                language, mixed = _language(body, cfg.language)
                timer.lap("language")
        judged.write((g, record, raw_chars, normal_chars, body, fate, quality, language, mixed))
    judged.close()
    n = run.cfg.near_dedup
    sigs = np.stack(signatures) if signatures else np.zeros((0, n.num_perm), np.uint32)
    gs = np.asarray(keys, dtype=np.uint64)
    save_array(run.path("judge", part, "signatures.npy"), sigs)
    save_array(run.path("judge", part, "keys.npy"), gs)
    entries = dedup.band_entries(dedup.band_keys(sigs, n.bands), gs)
    _save_buckets(run, "judge", part, "bands", entries, col=1)
    timer.lap("near_dedup")
    timer.save(run, "judge", part)


def _language(body: str, cfg) -> tuple[str | None, bool]:
    best, _, score = text.language_score(body, cfg.language)
    if score < cfg.min_score:
        return f"{cfg.language} probability {score:.2f} (most likely {best})", False
    return None, cfg.report_mixed and len(text.paragraph_languages(body)) > 1


class _Signatures:
    """Signatures of sorted document keys, read from the parts' files (not kept in memory)."""

    def __init__(self, run: Run):
        self.run = run

    def __call__(self, gs: np.ndarray) -> np.ndarray:
        out = np.zeros((len(gs), self.run.cfg.near_dedup.num_perm), dtype=np.uint32)
        parts = self.run.parts_of(gs)
        for p in np.unique(parts).tolist():
            mine = parts == p
            keys = np.load(self.run.path("judge", p, "keys.npy"), mmap_mode="r")
            rows = np.searchsorted(keys, gs[mine])
            if not np.array_equal(keys[np.minimum(rows, len(keys) - 1)], gs[mine]):
                raise RuntimeError(f"curate: part {p}'s signatures miss documents of a bucket")
            table = np.load(self.run.path("judge", p, "signatures.npy"), mmap_mode="r")
            out[mine] = table[rows]
            del table, keys  # unmapped: their pages leave this process
        return out


def _near(run: Run, bucket: int) -> None:
    """Bucket BUCKET's verified near-duplicate pairs."""
    timer, n = Timer(), run.cfg.near_dedup
    entries = load_arrays(_bucket_files(run, "judge", "bands", bucket), 3)
    lookup, edges, batch, size = _Signatures(run), [], [], 0
    threshold = n.threshold if n.verify else None
    for group in dedup.candidate_groups(entries):
        batch.append(group)
        size += len(group)
        if size >= SIGNATURE_BATCH:
            edges.append(dedup.verified_edges(batch, lookup, threshold))
            batch, size = [], 0
    edges.append(dedup.verified_edges(batch, lookup, threshold))
    rows = np.unique(np.concatenate(edges), axis=0)
    save_array(run.path("near", f"edges-{bucket}.npy"), rows)
    timer.lap("near_dedup")
    timer.save(run, "near", bucket)


def _cluster(run: Run, unit: int) -> None:
    timer = Timer()
    edges = load_arrays(_bucket_outputs(run, "near", "edges"), 2)
    run.save_by_part(dedup.clusters(edges), "near", "removed")
    timer.lap("near_dedup")
    timer.save(run, "cluster", unit)


def _final(run: Run, part: int) -> None:
    """Part PART's fates: near duplicates, quality, language, PII masking, decontamination; kept
    and removed documents written, documents and characters tallied after each step."""
    cfg, timer = run.cfg, Timer()
    near = dict(np.load(run.path("near", f"removed-{part}.npy")).tolist())
    index = _contamination_index(cfg) if cfg.decontaminate.enabled else {}
    tally: dict = {s: defaultdict(lambda: [0, 0]) for s in STEPS}
    pii: Counter = Counter()
    mixed_docs = 0
    out = run.path("final", part)
    out.mkdir(parents=True, exist_ok=True)
    kept_tmp, removed_tmp = out / f".kept.tmp-{os.getpid()}", out / f".removed.tmp-{os.getpid()}"
    with (
        open(kept_tmp, "w", encoding="utf-8") as kept,
        open(removed_tmp, "w", encoding="utf-8") as rm,
    ):
        for row in read_records(run.path("judge", part, "docs.pkl")):
            g, record, raw_chars, normal_chars, body, fate, quality, language, mixed = row
            timer.lap("other")
            if fate is None and g in near:
                fate = ("near_dedup", "MinHash near-duplicate", near[g])
            if fate is None and quality is not None:
                fate = ("quality", quality, None)
            if fate is None and language is not None:
                fate = ("language", language, None)
            judged_chars = len(body)
            counts = None
            if fate is None and cfg.pii.enabled:
                body, counts = text.mask_pii(body, cfg.pii)
                timer.lap("pii")
            if fate is None and index:
                hit = next((x for x in dedup.ngrams(body, cfg.decontaminate.ngram_words)
                            if x in index), None)  # fmt: skip
                if hit is not None:
                    reason = f"shares the {cfg.decontaminate.ngram_words}-gram {' '.join(hit)!r}"
                    fate = ("decontaminate", reason, index[hit])
                timer.lap("decontaminate")
            source, line = run.source(g)
            chars = [raw_chars, normal_chars] + [judged_chars] * 4 + [len(body)]
            last = STEPS.index(fate[0]) if fate else len(STEPS)
            for step, c in zip(STEPS[:last], chars, strict=False):
                tally[step][source][0] += 1
                tally[step][source][1] += c
            if fate is None:
                pii.update(counts or {})  # the kept documents' masks
                mixed_docs += mixed
                record[cfg.text_key] = body
                kept.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                rid = record.get(cfg.id_key)
                row = {"id": str(rid) if rid is not None else f"{source}:{line}",
                       "source": source, "line": line, "step": fate[0], "reason": fate[1]}  # fmt: skip
                if isinstance(fate[2], int):  # a document: its id is found by _assemble
                    row["matched_key"] = fate[2]
                elif fate[2] is not None:
                    row["matched"] = fate[2]
                rm.write(json.dumps(row, ensure_ascii=False) + "\n")
            timer.lap("write")
    os.replace(kept_tmp, out / "kept.jsonl")
    os.replace(removed_tmp, out / "removed.jsonl")
    stats = {"tally": tally, "pii": pii, "mixed": mixed_docs}
    write_atomic(out / "stats.json", json.dumps(stats).encode())
    timer.save(run, "final", part)


_INDEX: dict = {}


def _task_dirs(cfg: CurateConfig) -> list[str]:
    bundled = str(Path(__file__).resolve().parents[1] / "assets" / "tasks")
    return cfg.decontaminate.task_dirs or [bundled]


def _contamination_index(cfg: CurateConfig) -> dict:
    dirs, n = _task_dirs(cfg), cfg.decontaminate.ngram_words
    if (tuple(dirs), n) not in _INDEX:  # once per process
        _INDEX[tuple(dirs), n] = dedup.contamination_index(dirs, n)
    return _INDEX[tuple(dirs), n]


# ---------------------------------------------------------------- reading


def _records(chunk, key: str):
    """(line, record dict or the reason it is malformed) of a chunk."""
    if chunk.oversized:
        yield chunk.first_line, "record too large"
        return
    if chunk.kind != "jsonl":
        body = chunk.data.decode("utf-8", errors="replace").strip()
        if body:
            yield chunk.first_line, {key: body}
        return
    for offset, raw in enumerate(chunk.data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            yield chunk.first_line + offset, "malformed JSON"
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str) or not obj[key].strip():
            yield chunk.first_line + offset, f"no non-empty string {key!r}"
            continue
        yield chunk.first_line + offset, obj


# ---------------------------------------------------------------- output


def _report(run: Run, seconds: float, processes: int) -> dict:
    plan, parts = run.plan, range(len(run.plan["parts"]))
    tally = {s: defaultdict(lambda: [0, 0]) for s in STEPS}
    pii, skipped, mixed = Counter(), Counter(), 0
    for p in parts:
        stats = json.loads(run.path("final", p, "stats.json").read_text())
        for step, per_source in stats["tally"].items():
            for source, (docs, chars) in per_source.items():
                tally[step][source][0] += docs
                tally[step][source][1] += chars
        pii.update(stats["pii"])
        mixed += stats["mixed"]
        skipped.update(json.loads(run.path("scan", p, "read.json").read_text())["skipped"])
    step_seconds: Counter = Counter()
    for f in sorted(run.path("times").glob("*.json")):
        step_seconds.update(json.loads(f.read_text()))
    steps = {
        s: {
            "documents": sum(v[0] for v in tally[s].values()),
            "characters": sum(v[1] for v in tally[s].values()),
            "per_source": {
                src: {"documents": v[0], "characters": v[1]} for src, v in sorted(tally[s].items())
            },
        }
        for s in STEPS
    }
    removed = Counter()
    for before, after in zip(STEPS, STEPS[1:], strict=False):
        if steps[before]["documents"] != steps[after]["documents"]:
            removed[after] = steps[before]["documents"] - steps[after]["documents"]
    return {
        "inputs": plan["inputs"],
        "input_bytes": plan["input_bytes"],
        "documents": steps["read"]["documents"],
        "kept": steps["decontaminate"]["documents"],
        "skipped_records": dict(skipped),
        "steps": steps,
        "removed_by_step": dict(removed),
        "pii_masked": dict(pii),
        "mixed_language_documents": mixed,
        "seconds": round(seconds, 2),
        "processes": processes,
        "parts": len(plan["parts"]),
        "buckets": plan["buckets"],
        "step_seconds": {k: round(v, 3) for k, v in sorted(step_seconds.items())},
    }


def _assemble(run: Run, out: Path, report: dict) -> None:
    """The kept documents resharded by count, the removed ones in one file, and the report,
    written under a temporary name and renamed to OUT."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "kept").mkdir(parents=True)
    (tmp / "removed").mkdir()
    per_shard, shard, n, f = run.cfg.shard_documents, 0, 0, None
    for p in range(len(run.plan["parts"])):
        with open(run.path("final", p, "kept.jsonl"), encoding="utf-8") as src:
            for line in src:
                if f is None or n == per_shard:
                    if f is not None:
                        f.close()
                        shard += 1
                    f, n = open(tmp / "kept" / f"shard-{shard:05d}.jsonl", "w", encoding="utf-8"), 0  # noqa: SIM115
                f.write(line)
                n += 1
    if f is None:
        (tmp / "kept" / "shard-00000.jsonl").touch()
    else:
        f.close()
    _write_removed(run, tmp / "removed" / "removed.jsonl")
    (tmp / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (tmp / "report.md").write_text(report_table(report))
    _plot(report, tmp / "report.png")
    os.replace(tmp, out)


def _write_removed(run: Run, path: Path) -> None:
    """The parts' removed documents in one file, each duplicate naming the document it matched
    by id (by file:line for a record without one)."""
    parts = range(len(run.plan["parts"]))
    wanted = set()
    for p in parts:
        with open(run.path("final", p, "removed.jsonl"), encoding="utf-8") as src:
            wanted.update(json.loads(line).get("matched_key", -1) for line in src)
    ids = {}
    for p in parts:
        ids.update((g, i) for g, i in read_records(run.path("scan", p, "ids.pkl")) if g in wanted)
    with open(path, "w", encoding="utf-8") as dst:
        for p in parts:
            with open(run.path("final", p, "removed.jsonl"), encoding="utf-8") as src:
                for line in src:
                    row = json.loads(line)
                    if "matched_key" in row:
                        g = row.pop("matched_key")
                        row["matched"] = ids[g] if g in ids else run.where(g)
                    dst.write(json.dumps(row, ensure_ascii=False) + "\n")


def report_table(report: dict) -> str:
    lines = ["| after step | documents | characters |", "|---|---:|---:|"]
    for step in STEPS:
        if step in report["steps"]:
            s = report["steps"][step]
            lines.append(f"| {step} | {s['documents']:,} | {s['characters']:,} |")
    pii = ", ".join(f"{k} {v}" for k, v in sorted(report["pii_masked"].items())) or "none"
    lines.append(f"\nPII masked: {pii}. Skipped records: {report['skipped_records'] or 'none'}.")
    return "\n".join(lines) + "\n"


def _plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s for s in STEPS if s in report["steps"]]
    sources = sorted(report["steps"]["read"]["per_source"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for source in sources:
        counts = [
            report["steps"][s]["per_source"].get(source, {}).get("documents", 0) for s in steps
        ]
        ax.plot(steps, counts, "o-", label=Path(source).name)
    ax.set_ylabel("documents kept")
    ax.set_title("documents kept after each curation step")
    ax.tick_params(axis="x", rotation=30)
    if len(sources) <= 10:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
