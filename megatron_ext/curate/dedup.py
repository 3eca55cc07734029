"""Corpus-level steps: exact document and boilerplate-line deduplication, MinHash near-duplicate
clusters, and n-gram decontamination against evaluation data.

The near-duplicate step is built from parts that work on arrays, so `pipeline` can run them per
hash bucket with bounded memory (`near_duplicates` runs them on a list in memory):
`signature` (rensa's MinHash of a document's word-shingles) -> `band_keys` (one 64-bit key per
LSH band) -> `candidate_groups` (documents sharing a band key) -> `verified_edges` (pairs whose
estimated Jaccard similarity reaches the threshold) -> `clusters` (connected components; the
earliest document is kept).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from megatron_ext.curate.text import words

# A document's global key: its input file's index << 32 | its line (input order = key order).
LINE_BITS = 32


def digest(text: str) -> int:
    """A 64-bit hash of TEXT (exact duplicates; boilerplate lines)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def line_hashes(text: str, min_chars: int) -> set[int]:
    """The hashes of TEXT's lines (stripped) at least MIN_CHARS long."""
    return {digest(s) for line in text.split("\n") if len(s := line.strip()) >= min_chars}


def drop_lines(text: str, boilerplate, min_chars: int) -> tuple[str, int]:
    """TEXT without its lines whose hash is in BOILERPLATE; how many were dropped."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        s = line.strip()
        if len(s) >= min_chars and digest(s) in boilerplate:
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def shingles(text: str, n: int) -> list[str]:
    """TEXT's distinct lower-cased word N-grams (a text shorter than N words is one shingle)."""
    ws = words(text.lower())
    return sorted({" ".join(ws[k : k + n]) for k in range(max(1, len(ws) - n + 1))})


def signature(text: str, cfg) -> np.ndarray:
    """The MinHash signature (uint32, cfg.num_perm values) of TEXT's word shingles (rensa)."""
    from rensa import RMinHash

    m = RMinHash(num_perm=cfg.num_perm, seed=cfg.seed)
    m.update(shingles(text, cfg.shingle_words))
    return np.asarray(m.digest(), dtype=np.uint32)


_MIX = np.uint64(0x9E3779B97F4A7C15)


def band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """[n, bands] uint64: one key per LSH band (its rows mixed into 64 bits; a collision of
    unequal bands has probability ~2^-64)."""
    n, perm = signatures.shape
    rows = signatures.reshape(n, bands, perm // bands).astype(np.uint64)
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows.shape[2]):
            keys = (keys ^ rows[:, :, r]) * _MIX
            keys ^= keys >> np.uint64(29)
    return keys


def band_entries(keys: np.ndarray, gs: np.ndarray) -> np.ndarray:
    """[n * bands, 3] uint64 rows (band, key, document key) of documents GS' band KEYS."""
    n, bands = keys.shape
    band = np.broadcast_to(np.arange(bands, dtype=np.uint64), (n, bands))
    g = np.broadcast_to(gs.astype(np.uint64)[:, None], (n, bands))
    return np.stack([band.ravel(), keys.ravel(), g.ravel()], axis=1)


def candidate_groups(entries: np.ndarray):
    """Yield the documents (sorted keys) of each band bucket holding more than one: the LSH
    candidates (one array at a time: the groups are not all held)."""
    if len(entries) == 0:
        return
    e = entries[np.lexsort((entries[:, 2], entries[:, 1], entries[:, 0]))]
    new = np.ones(len(e), dtype=bool)
    new[1:] = (e[1:, 0] != e[:-1, 0]) | (e[1:, 1] != e[:-1, 1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(e)))
    keys = np.ascontiguousarray(e[:, 2])
    del e, new
    for s, k in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist(), strict=True):
        yield keys[s : s + k]


def verified_edges(groups: list[np.ndarray], lookup, threshold: float | None) -> np.ndarray:
    """[m, 2] uint64 duplicate pairs (earlier, later) from candidate GROUPS: in key order, a
    document is compared with the group's documents that matched nothing earlier, and joined to
    the first whose estimated Jaccard similarity is at least THRESHOLD. LOOKUP(keys) gives the
    signatures of sorted unique document keys. THRESHOLD None: every document of a group is
    joined to its first (no verification)."""
    edges: list[tuple[int, int]] = []
    if not groups:
        return np.zeros((0, 2), dtype=np.uint64)
    if threshold is None:
        pairs = [np.stack([np.full(len(g) - 1, g[0]), g[1:]], axis=1) for g in groups]
        return np.concatenate(pairs).astype(np.uint64)
    members = np.unique(np.concatenate(groups))
    sigs = lookup(members)
    for group in groups:
        rows = sigs[np.searchsorted(members, group)]
        reps = [0]
        for i in range(1, len(group)):
            same = (rows[reps] == rows[i]).mean(axis=1)
            hit = np.flatnonzero(same >= threshold)
            if len(hit):
                edges.append((int(group[reps[hit[0]]]), int(group[i])))
            else:
                reps.append(i)
    return np.asarray(edges, dtype=np.uint64).reshape(-1, 2)


def clusters(edges: np.ndarray) -> np.ndarray:
    """[m, 2] uint64 rows (removed document, the document kept for it), sorted: the connected
    components of EDGES, each keeping its earliest document. Arrays only (label propagation
    with pointer jumping): about 40 bytes per edge."""
    if len(edges) == 0:
        return np.zeros((0, 2), dtype=np.uint64)
    nodes, idx = np.unique(edges, return_inverse=True)
    a, b = idx.reshape(-1, 2).T.astype(np.int64)
    del idx
    label = np.arange(len(nodes))  # nodes are sorted: the smallest label is the earliest document
    while True:
        low = np.minimum(label[a], label[b])
        before = label.copy()
        np.minimum.at(label, a, low)
        np.minimum.at(label, b, low)
        while True:  # every node points at its label's label, until that is a root
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
        if np.array_equal(label, before):
            break
    removed = np.flatnonzero(label != np.arange(len(nodes)))
    return np.stack([nodes[removed], nodes[label[removed]]], axis=1)


def near_duplicates(texts: list[str], cfg) -> dict[int, int]:
    """{index of a removed document: index of the document kept in its cluster}, in memory (the
    pipeline runs the same parts per hash bucket)."""
    if not texts:
        return {}
    sigs = np.stack([signature(t, cfg) for t in texts])
    gs = np.arange(len(texts), dtype=np.uint64)
    groups = list(candidate_groups(band_entries(band_keys(sigs, cfg.bands), gs)))
    threshold = cfg.threshold if cfg.verify else None
    edges = verified_edges(groups, lambda keys: sigs[keys.astype(np.int64)], threshold)
    return {int(r): int(k) for r, k in clusters(edges)}


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
