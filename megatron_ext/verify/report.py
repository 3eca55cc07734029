"""DIR/results.jsonl (one line per finished section, appended and synced at once) and
DIR/summary.md (rendered again from results.jsonl after every section: one table per section,
the newest line of each section wins, so a rerun of one section replaces it in the summary).

Rendering is generic: scalars and nested dicts become key | value rows (nested keys dotted),
lists of dicts become tables, long text (a compiler's output) a fenced block.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from megatron_ext.verify.common import read_jsonl

HEAD_KEYS = ("section", "title", "status", "seconds", "cap_s", "dry_run")
LONG_TEXT = 200  # strings longer than this go into a fenced block
MAX_TABLE_ROWS = 60


def append_result(out: Path, record: dict) -> None:
    """Append one section's record to out/results.jsonl, flushed and synced before returning."""
    with (out / "results.jsonl").open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def latest_by_section(out: Path) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for row in read_jsonl(out / "results.jsonl"):
        latest[row.get("section", "?")] = row
    return dict(sorted(latest.items()))


def render_summary(out: Path) -> Path:
    """Write out/summary.md from out/results.jsonl (atomically: a reader never sees half)."""
    rows = latest_by_section(out)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    lines = [f"# gpu_verify summary ({now})", "", "| section | title | status | seconds | cap s |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, row in rows.items():
        lines.append(f"| {name} | {row.get('title', '')} | {row.get('status')} | "
                     f"{_fmt(row.get('seconds'))} | {_fmt(row.get('cap_s'))} |")  # fmt: skip
    for name, row in rows.items():
        lines += ["", f"## {name} {row.get('title', '')}: {row.get('status')}", ""]
        lines += section_markdown(row)
    path = out / "summary.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def section_markdown(row: dict) -> list[str]:
    """One section's figures: a key | value table, then its tables and long texts."""
    scalars, tables, texts = [], [], []
    for key, value in row.items():
        if key in HEAD_KEYS:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.append((key, value))
        elif isinstance(value, str) and (len(value) > LONG_TEXT or "\n" in value):
            texts.append((key, value))
        else:
            scalars.extend(_flatten(key, value))
    lines = []
    if scalars:
        lines += ["| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in scalars]
    for key, table in tables:
        lines += ["", f"**{key}**", ""] + table_markdown(table)
    for key, text in texts:
        lines += ["", f"**{key}**", "", "```", text.strip("\n"), "```"]
    return lines


def table_markdown(rows: list[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:MAX_TABLE_ROWS]:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    if len(rows) > MAX_TABLE_ROWS:
        lines.append(f"| ... {len(rows) - MAX_TABLE_ROWS} more rows in results.jsonl |")
    return lines


def _flatten(key: str, value) -> list[tuple[str, object]]:
    if isinstance(value, dict):
        if not value:
            return [(key, "{}")]
        return [kv for k, v in value.items() for kv in _flatten(f"{key}.{k}", v)]
    return [(key, value)]


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return "None" if value is None else str(value)


def _cell(value) -> str:
    if isinstance(value, (list, tuple)):
        value = ", ".join(_fmt(v) for v in value)
    text = _fmt(value) if not isinstance(value, str) else value
    return text.replace("|", "\\|").replace("\n", " ")[:LONG_TEXT]
