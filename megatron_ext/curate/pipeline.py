"""`megatron-ext curate`: the steps in order over a corpus, kept documents as JSONL shards, removed
ones with their reason, and a report.

Order: normalise -> exact document dedup -> boilerplate lines -> near-duplicates -> quality ->
language -> PII masking -> decontamination. Output (written under DIR.tmp-*, renamed to DIR at
the end: an interrupted run leaves nothing under the final name and is run again):

    DIR/kept/shard-00000.jsonl ...   kept documents, input order, their other fields kept
    DIR/removed/removed.jsonl        {"id", "source", "line", "step", "reason", "matched"}
    DIR/report.json, report.md, report.png   documents and characters per step and per source

Per-document steps run in `workers` processes (ordered chunks: the output does not depend on
the number); the corpus-level steps run in this process, documents held in memory (this first
version; sharded on-disk signatures are future work).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.curate import dedup, text
from megatron_ext.curate.config import CurateConfig
from megatron_ext.data.inputs import expand_inputs, iter_chunks
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

STEPS = ("read", "exact_dedup", "boilerplate", "near_dedup", "quality", "language", "decontaminate")


@dataclass
class Doc:
    source: str
    line: int
    record: dict
    text: str
    id: str
    removed: dict | None = None
    problems: dict = field(default_factory=dict)  # quality/language: the rule broken, or None
    mixed: bool = False  # paragraphs in more than one language


def read_documents(inputs: list[str], cfg: CurateConfig, strict: bool) -> tuple[list[Doc], Counter]:
    """Every record of the inputs (JSONL objects keep their fields; a .txt file is one document);
    malformed records skipped and counted, or with STRICT the first one stops the run."""
    docs, skipped = [], Counter()
    for chunk in iter_chunks(expand_inputs(inputs)):
        for line_no, record in _records(chunk, cfg.text_key):
            if isinstance(record, str):
                if strict:
                    raise UserError(f"{chunk.path}:{line_no}: {record} (--strict)")
                skipped[record] += 1
                continue
            rid = record.get(cfg.id_key)
            rid = str(rid) if rid is not None else f"{chunk.path}:{line_no}"
            docs.append(Doc(chunk.path, line_no, record, record[cfg.text_key], rid))
    return docs, skipped


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


def _per_document(args) -> tuple[str, str | None, str | None, bool]:
    """(normalised text, quality problem, language problem, mixed languages) of one document:
    the steps that need no other document, run in the workers."""
    body, cfg = args
    if cfg.normalise.enabled:
        body = text.normalise(body, cfg.normalise)
    quality = text.quality_problem(body, cfg.quality) if cfg.quality.enabled else None
    language, mixed = None, False
    if cfg.language.enabled:
        best, _, score = text.language_score(body, cfg.language.language)
        if score < cfg.language.min_score:
            language = f"{cfg.language.language} probability {score:.2f} (most likely {best})"
        elif cfg.language.report_mixed:
            mixed = len(text.paragraph_languages(body)) > 1
    return body, quality, language, mixed


def _remove(doc: Doc, step: str, reason: str, matched: str | None = None) -> None:
    doc.removed = {"step": step, "reason": reason}
    if matched is not None:
        doc.removed["matched"] = matched


def curate(
    inputs: list[str], output: str, cfg: CurateConfig, workers: int = 1, strict: bool = False
) -> dict:
    out = Path(output)
    if out.exists():
        raise UserError(f"{out} exists: give a new --output directory (nothing was written)")
    started = time.perf_counter()
    docs, skipped = read_documents(inputs, cfg, strict)
    if not docs:
        raise UserError(f"{', '.join(inputs)}: no document to curate")
    stats = {"read": _tally(docs)}
    per_doc = [(d.text, cfg) for d in docs]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_per_document, per_doc, chunksize=64))
    else:
        results = [_per_document(a) for a in per_doc]
    for doc, (body, quality, language, mixed) in zip(docs, results, strict=True):
        doc.text, doc.problems, doc.mixed = body, {"quality": quality, "language": language}, mixed
    _exact_and_lines(docs, cfg, stats)
    live = [d for d in docs if d.removed is None]
    if cfg.near_dedup.enabled:
        for i, kept in dedup.near_duplicates([d.text for d in live], cfg.near_dedup).items():
            _remove(live[i], "near_dedup", "MinHash near-duplicate", live[kept].id)
    stats["near_dedup"] = _tally(docs)
    for step in ("quality", "language"):
        for d in docs:
            if d.removed is None and d.problems[step] is not None:
                _remove(d, step, d.problems[step])
        stats[step] = _tally(docs)
    pii = Counter()
    if cfg.pii.enabled:
        for d in docs:
            if d.removed is None:
                d.text, counts = text.mask_pii(d.text, cfg.pii)
                pii.update(counts)
    _decontaminate(docs, cfg)
    stats["decontaminate"] = _tally(docs)
    report = {
        "inputs": inputs,
        "documents": len(docs),
        "kept": sum(d.removed is None for d in docs),
        "skipped_records": dict(skipped),
        "steps": stats,
        "removed_by_step": dict(Counter(d.removed["step"] for d in docs if d.removed)),
        "pii_masked": dict(pii),
        "mixed_language_documents": sum(d.mixed for d in docs),
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write(out, docs, cfg, report)
    return report


def _exact_and_lines(docs: list[Doc], cfg: CurateConfig, stats: dict) -> None:
    e = cfg.exact_dedup
    if e.enabled:
        first: dict[bytes, str] = {}
        for d in docs:
            key = dedup.digest(d.text)
            if key in first:
                _remove(d, "exact_dedup", "identical text", first[key])
            else:
                first[key] = d.id
    stats["exact_dedup"] = _tally(docs)
    if e.enabled and e.lines:
        live = [d for d in docs if d.removed is None]
        counts = dedup.line_counts([d.text for d in live], e.min_line_chars)
        for d in live:
            before = len(d.text)
            d.text, dropped = dedup.drop_lines(d.text, counts, e)
            if dropped and len(d.text.strip()) < e.min_kept_fraction * before:
                _remove(d, "boilerplate", f"{dropped} boilerplate lines left too little text")
    stats["boilerplate"] = _tally(docs)


def _decontaminate(docs: list[Doc], cfg: CurateConfig) -> None:
    c = cfg.decontaminate
    if not c.enabled:
        return
    dirs = c.task_dirs or [str(Path(__file__).resolve().parents[1] / "assets" / "tasks")]
    index = dedup.contamination_index(dirs, c.ngram_words)
    for d in docs:
        if d.removed is None and index:
            hit = next((g for g in dedup.ngrams(d.text, c.ngram_words) if g in index), None)
            if hit is not None:
                _remove(
                    d,
                    "decontaminate",
                    f"shares the {c.ngram_words}-gram {' '.join(hit)!r}",
                    index[hit],
                )


def _tally(docs: list[Doc]) -> dict:
    """Documents and characters still kept, in all and per source."""
    per_source: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for d in docs:
        if d.removed is None:
            per_source[d.source][0] += 1
            per_source[d.source][1] += len(d.text)
    return {
        "documents": sum(v[0] for v in per_source.values()),
        "characters": sum(v[1] for v in per_source.values()),
        "per_source": {
            s: {"documents": v[0], "characters": v[1]} for s, v in sorted(per_source.items())
        },
    }


def _write(out: Path, docs: list[Doc], cfg: CurateConfig, report: dict) -> None:
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "kept").mkdir(parents=True)
    (tmp / "removed").mkdir()
    kept = [d for d in docs if d.removed is None]
    for s in range(0, max(1, len(kept)), cfg.shard_documents):
        with open(
            tmp / "kept" / f"shard-{s // cfg.shard_documents:05d}.jsonl", "w", encoding="utf-8"
        ) as f:
            for d in kept[s : s + cfg.shard_documents]:
                f.write(json.dumps({**d.record, cfg.text_key: d.text}, ensure_ascii=False) + "\n")
    with open(tmp / "removed" / "removed.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            if d.removed is not None:
                row = {"id": d.id, "source": d.source, "line": d.line, **d.removed}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (tmp / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (tmp / "report.md").write_text(report_table(report))
    _plot(report, tmp / "report.png")
    os.replace(tmp, out)


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
