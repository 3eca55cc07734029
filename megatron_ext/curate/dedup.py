"""Corpus-level steps: exact document and boilerplate-line deduplication, MinHash near-duplicate
clusters (datasketch's MinHash and LSH), and n-gram decontamination against evaluation data."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from megatron_ext.curate.text import words


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def line_counts(texts: list[str], min_chars: int) -> Counter:
    """How many documents each line (stripped, long enough) occurs in."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(
            {digest(s) for line in text.split("\n") if len(s := line.strip()) >= min_chars}
        )
    return counts


def drop_lines(text: str, counts: Counter, cfg) -> tuple[str, int]:
    """TEXT without its boilerplate lines; how many were dropped."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        s = line.strip()
        if len(s) >= cfg.min_line_chars and counts[digest(s)] > cfg.max_line_documents:
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:  # the smaller index (earlier in the input) is the root: the one kept
            self.parent[max(a, b)] = min(a, b)


def near_duplicates(texts: list[str], cfg) -> dict[int, int]:
    """{index of a removed document: index of the document kept in its cluster}. A pair is a
    duplicate when LSH makes it a candidate and its MinHash Jaccard estimate is at least the
    threshold; clusters are the connected pairs; the earliest document of a cluster is kept."""
    from datasketch import MinHash, MinHashLSH

    rows = cfg.num_perm // cfg.bands
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(cfg.bands, rows))
    signatures = []
    uf = _UnionFind(len(texts))
    for i, text in enumerate(texts):
        ws = [w.lower() for w in words(text)]
        n = cfg.shingle_words
        shingles = {" ".join(ws[k : k + n]).encode() for k in range(max(1, len(ws) - n + 1))}
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch(sorted(shingles))
        signatures.append(m)
        for key in lsh.query(m):
            j = int(key)
            if m.jaccard(signatures[j]) >= cfg.threshold:
                uf.union(i, j)
        lsh.insert(str(i), m)
    return {i: uf.find(i) for i in range(len(texts)) if uf.find(i) != i}


# ---------------------------------------------------------------- decontamination


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _example_texts(example: dict) -> list[str]:
    """A BIG-bench example's strings, and its input followed by each target or choice (the
    text a model would have memorised)."""
    texts = _strings(example)
    prompt = example.get("input")
    if isinstance(prompt, str):
        targets = example.get("target_scores") or {}
        target = example.get("target")
        targets = [*targets, *([target] if isinstance(target, str) else target or [])]
        texts += [f"{prompt} {t}" for t in targets if isinstance(t, str)]
    return texts


def evaluation_texts(task_dirs: list[str]) -> dict[str, list[str]]:
    """{file: its texts}: BIG-bench task.json examples (inputs, targets, choices) and every string
    of lm-eval JSONL task data under TASK_DIRS."""
    found: dict[str, list[str]] = {}
    for d in task_dirs:
        for path in sorted(Path(d).rglob("*")):
            if path.name == "task.json":
                examples = json.loads(path.read_text(encoding="utf-8")).get("examples", [])
                found[str(path)] = [s for ex in examples for s in _example_texts(ex)]
            elif path.suffix == ".jsonl":
                lines = path.read_text(encoding="utf-8").splitlines()
                found[str(path)] = [
                    s for ln in lines if ln.strip() for s in _strings(json.loads(ln))
                ]
    return found


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """TEXT's lower-cased word n-grams in text order (the first match is reported: the same in
    every process, unlike a set's order)."""
    ws = [w.lower() for w in words(text)]
    return [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]


def contamination_index(task_dirs: list[str], n: int) -> dict[tuple[str, ...], str]:
    """{word n-gram: the evaluation file it comes from}."""
    index: dict[tuple[str, ...], str] = {}
    for path, texts in evaluation_texts(task_dirs).items():
        for text in texts:
            for gram in ngrams(text, n):
                index.setdefault(gram, path)
    return index
