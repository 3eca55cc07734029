"""Near-duplicate detection of `megatron-ext curate` against planted truth, and its throughput.

    python benchmarks/curate_neardup.py [--bases 150] [--record FILE]

Corpus: the bundled Finnish sample's documents of at least 200 words as bases; for each base,
variants made by swapping adjacent words, dropping sentences or adding sentences from another
document, each variant's true Jaccard similarity to its base computed exactly on the step's
shingles (word 5-grams). Pairs: every (base, variant). Positives: true Jaccard >= threshold +
0.05; negatives: < threshold - 0.05 (the band between is where MinHash is expected to waver).
Reported: recall (positives found in the same cluster), precision (of found pairs, the positives'
share, the band excluded), and documents/s and MB/s of the near-duplicate step on one core.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # megatron_ext, uninstalled

from common import finish  # noqa: E402

from megatron_ext.curate import dedup  # noqa: E402
from megatron_ext.curate.config import NearDedupConfig  # noqa: E402
from megatron_ext.curate.text import words  # noqa: E402
from megatron_ext.demo.gimp_corpus import sample_corpus_path  # noqa: E402


def shingles(text: str, n: int) -> set[str]:
    """The step's own shingles (lower-cased word N-grams), as a set."""
    return set(dedup.shingles(text, n))


def jaccard(a: str, b: str, n: int) -> float:
    x, y = shingles(a, n), shingles(b, n)
    return len(x & y) / len(x | y)


def variant(base: str, other: str, rng: random.Random) -> str:
    sentences = [s for s in base.replace("\n", " ").split(". ") if s]
    kind = rng.choice(["swap", "drop", "add"])
    if kind == "swap":
        ws = base.split()
        for _ in range(rng.randint(1, max(1, len(ws) // 15))):
            k = rng.randrange(len(ws) - 1)
            ws[k], ws[k + 1] = ws[k + 1], ws[k]
        return " ".join(ws)
    if kind == "drop":
        keep = [s for s in sentences if rng.random() > rng.uniform(0.02, 0.5)]
        return ". ".join(keep or sentences[:1])
    extra = [s for s in other.replace("\n", " ").split(". ") if s]
    added = rng.sample(extra, min(len(extra), rng.randint(1, max(1, len(sentences) // 2))))
    return ". ".join(sentences + added)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bases", type=int, default=150)
    p.add_argument("--variants", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", default=None)
    args = p.parse_args(argv)
    cfg = NearDedupConfig()
    rng = random.Random(args.seed)
    texts = [json.loads(line)["text"] for line in gzip.open(sample_corpus_path(), "rt")]
    bases = [t for t in texts if len(words(t)) >= 200][: args.bases]
    docs, pairs = list(bases), []
    for i, base in enumerate(bases):
        for _ in range(args.variants):
            docs.append(variant(base, bases[(i + 1) % len(bases)], rng))
            pairs.append((i, len(docs) - 1, jaccard(base, docs[-1], cfg.shingle_words)))
    started = time.perf_counter()
    removed = dedup.near_duplicates(docs, cfg)
    seconds = time.perf_counter() - started
    root = [removed.get(i, i) for i in range(len(docs))]
    found = {(i, j): root[i] == root[j] for i, j, _ in pairs}
    positives = [(i, j) for i, j, jac in pairs if jac >= cfg.threshold + 0.05]
    negatives = [(i, j) for i, j, jac in pairs if jac < cfg.threshold - 0.05]
    true_found = sum(found[p] for p in positives)
    false_found = sum(found[p] for p in negatives)
    recall = true_found / max(1, len(positives))
    precision = true_found / max(1, true_found + false_found)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    lines = [
        f"{len(docs)} documents ({len(bases)} bases, {len(pairs)} planted pairs: "
        f"{len(positives)} with Jaccard >= {cfg.threshold + 0.05:.2f}, {len(negatives)} below "
        f"{cfg.threshold - 0.05:.2f}), {megabytes:.2f} MB",
        "",
        "| recall | precision | near-duplicate step | documents/s | MB/s (one core) |",
        "|---:|---:|---:|---:|---:|",
        f"| {recall:.3f} | {precision:.3f} | {seconds:.2f} s | {len(docs) / seconds:,.0f} "
        f"| {megabytes / seconds:.2f} |",
    ]
    finish(lines, "curate_neardup.py", args.record, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
