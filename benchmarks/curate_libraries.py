"""Candidate libraries for `megatron-ext curate` measured on Finnish text (issue 20): MinHash
signatures, language identification and mojibake repair.

    /work/venvs/curate-bench/bin/python benchmarks/curate_libraries.py [--record FILE]

A library that does not import is skipped with a printed note (datatrove and lingua live only in
a side environment). The process is pinned to one CPU core (`sched_setaffinity`, and
`RAYON_NUM_THREADS=1` for the Rust extensions); every speed is the fastest of `--repeat` runs.
Sizes are UTF-8 bytes of the document texts, 1 MB = 10^6 bytes.

MinHash (128 permutations, seed 1). Corpus: the Finnish GIMP manual (`--fi-dir`, Debian
`gimp-help-fi`, pages extracted by `iter_html_documents`; the bundled sample if absent).
Shingles: `megatron_ext.curate.text.words`, lower-cased, word 5-grams joined by spaces, as a
set; making them is timed once as its own row. Each library then gets the same list of shingle
strings per document and is timed to its signature: datasketch `MinHash.update_batch` (the
strings UTF-8 encoded inside the timing: it takes bytes), rensa `RMinHash`/`CMinHash`
`.update(list).digest()` and rensa's batch `RMinHash.digest_matrix_from_token_sets`, datatrove's
`MinhashDedupSignature` path (its xxhash64 of each shingle string, then its `get_signature`).
Quality: bases are manual pages of at least 200 words (evenly spread), each with `--variants`
planted variants (`variant` of benchmarks/curate_neardup.py: swapped words, dropped sentences or
added sentences), the exact Jaccard similarity of each (base, variant) pair computed on the
shingle sets. Per library: mean absolute error and mean signed error (bias) of the signature
estimate (share of equal positions) against the exact value; and a pair counts as found when
LSH banding (16 bands x 8 rows) makes it collide in some band AND its estimate is >= 0.8.
Positives: exact Jaccard >= 0.85, negatives: < 0.75; recall = found positives / positives,
precision = found positives / all found (band between excluded).

Language identification. Truth: the Finnish bundled sample, Swedish, English and German GIMP
manuals (Debian `gimp-help-sv/-en/-de`) and, for Estonian (no GIMP manual), LibreOffice's
Estonian help (`--lang-dir et=DIR`). These manuals are partly untranslated, so each page keeps
only its paragraphs whose marker words (frequent function words of the language, below) number
at least 2 and at least 3x the English ones (English: the reverse); pages with 200+ characters
left, `--langid-docs` evenly spread per language. Snippets: the first `--snippets` (100, 30)
characters of each. Candidates: py3langid (all 140 languages of its model; restricted to
`RESTRICTED`) and lingua (all 75 languages and restricted, each in high- and low-accuracy mode).
Accuracy: share of a language's documents identified as that language; false fi: non-Finnish
documents identified as Finnish. Speed: all languages' documents, whole ones timed once,
snippets the fastest of `--repeat`. Load: building the detector plus one call per
language (lingua loads its models lazily), in seconds and in resident memory gained.

Mojibake. Finnish manual pages, made into mojibake by encoding as UTF-8 and decoding as cp1252
(bytes cp1252 leaves undefined decoded as Latin-1, as browsers do) or as Latin-1. Repaired
(counted over the pages the mojibake changed): `ftfy.fix_text(mojibake, normalization="NFC")`
equals NFC of the original; clean unchanged: `fix_text(original)` equals NFC of the original.
Also `fix_text` with `uncurl_quotes=False`, that only where `ftfy.badness.is_bad` flags the text
(NFC otherwise), and `unicodedata.normalize("NFC")` alone, the step without ftfy.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import importlib.metadata
import json
import os
import random
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # megatron_ext, uninstalled

from common import best, finish  # noqa: E402
from curate_neardup import shingles, variant  # noqa: E402

from megatron_ext.curate.text import words  # noqa: E402
from megatron_ext.demo.gimp_corpus import (  # noqa: E402
    DEFAULT_INPUT_DIR,
    HtmlCorpusConfig,
    iter_html_documents,
    sample_corpus_path,
)
from megatron_ext.errors import UserError  # noqa: E402

NUM_PERM, BANDS, THRESHOLD, SEED, SHINGLE = 128, 16, 0.8, 1, 5
LANGS = ["fi", "sv", "et", "en", "de"]
RESTRICTED = ["fi", "sv", "et", "en", "de", "da", "no", "ru"]
GIMP_HELP = "/usr/share/gimp/2.0/help"
MARKERS = {
    "fi": "ja tai ei se sen ne niin kun jos kuin että joka jotka voi voit voidaan myös tämä tämän "
    "nämä ovat ole olla oli mutta kanssa sekä tässä siitä sitä mitä mikä kuvan tason avulla",
    "sv": "och att det som är en ett för på med av till den inte om har kan du eller från vid när "
    "så men också detta dessa sedan måste bilden lagret verktyget",
    "et": "ja ei see kui et või mis ka selle seda saab kus siis oma nii aga kõik ning tuleb "
    "kasutada valige saate abil need kas ole mida seal kohta korral",
    "de": "und der die das ist nicht mit ein eine für auf sie sich den dem von zu es im werden "
    "wird können oder auch wenn bei einer einen des diese dieser kann",
    "en": "the and is of to a in you this for with can are be it that by on as or an if from "
    "your which will not when use",
}
MARKERS = {k: set(v.split()) for k, v in MARKERS.items()}
for _k in MARKERS:
    if _k != "en":
        MARKERS[_k] -= MARKERS["en"]


def available(module: str, dist: str | None = None) -> str | None:
    """The installed version of DIST when MODULE imports, else None (with a printed note)."""
    try:
        __import__(module)
    except ImportError as exc:
        print(f"note: {module} not importable ({exc}); skipped", file=sys.stderr)
        return None
    return importlib.metadata.version(dist or module)


def html_texts(directory: str) -> list[str] | None:
    try:
        return [d["text"] for d in iter_html_documents(HtmlCorpusConfig(input_dir=directory))]
    except UserError as exc:
        print(f"note: {exc}; skipped", file=sys.stderr)
        return None


def sample_texts() -> list[str]:
    return [json.loads(line)["text"] for line in gzip.open(sample_corpus_path(), "rt")]


def spread(items: list, n: int) -> list:
    """N items evenly spread over ITEMS (all when fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[k * len(items) // n] for k in range(n)]


def mb(texts) -> float:
    return sum(len(t.encode()) for t in texts) / 1e6


# ---------------------------------------------------------------- MinHash


def signers(versions: dict) -> dict:
    """{name: (per-document signer or None, batch signer or None)}; a signer maps shingle
    lists to signatures (any sequence of NUM_PERM ints)."""
    out = {}
    if versions.get("datasketch"):
        from datasketch import MinHash

        def ds(sh):
            m = MinHash(num_perm=NUM_PERM, seed=SEED)
            m.update_batch([s.encode() for s in sh])
            return m.hashvalues

        out[f"datasketch {versions['datasketch']} MinHash.update_batch"] = (ds, None)
    if versions.get("rensa"):
        import rensa

        for cls in (rensa.RMinHash, rensa.CMinHash):

            def rs(sh, cls=cls):
                m = cls(NUM_PERM, SEED)
                m.update(sh)
                return m.digest()

            out[f"rensa {versions['rensa']} {cls.__name__}"] = (rs, None)

        def rs_batch(shs):
            return rensa.RMinHash.digest_matrix_from_token_sets(shs, NUM_PERM, SEED).to_rows()

        out[f"rensa {versions['rensa']} RMinHash.digest_matrix_from_token_sets (batch)"] = (
            None,
            rs_batch,
        )
    if versions.get("datatrove"):
        import numpy as np
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.word_tokenizers import WordTokenizer

        class Words(WordTokenizer):  # only to build the step; shingles are made outside
            def word_tokenize(self, text):
                return words(text)

            def sent_tokenize(self, text):
                return [text]

            def span_tokenize(self, text):
                return [(0, len(text))]

        cfg = MinhashConfig(
            n_grams=SHINGLE, num_buckets=BANDS, hashes_per_bucket=NUM_PERM // BANDS, seed=SEED
        )
        step = MinhashDedupSignature(tempfile.mkdtemp(), cfg, language=Words())
        h = step._hash_func  # what its get_shingles applies to each " "-joined n-gram

        def dt(sh):
            hashes = np.fromiter((h(s) for s in sh), dtype=np.uint64, count=len(sh))
            return [v for bucket in step.get_signature(hashes.reshape(-1, 1)) for v in bucket]

        out[f"datatrove {versions['datatrove']} MinhashDedupSignature ({cfg.hash_config})"] = (
            dt,
            None,
        )
    return out


def minhash_section(args, versions: dict, fi_texts: list[str]) -> list[str]:
    import numpy as np

    lines = ["## MinHash signatures", ""]
    shingle_lists: list[list[str]] = []

    def make_shingles():
        shingle_lists[:] = [list(shingles(t, SHINGLE)) for t in fi_texts]

    t_sh = best(make_shingles, args.repeat)
    size = mb(fi_texts)
    n_sh = sum(len(s) for s in shingle_lists)

    rng = random.Random(args.seed)
    eligible = [t for t in fi_texts if len(words(t)) >= 200]
    bases = spread(eligible, args.bases)
    pairs = []  # (base shingles, variant shingles, exact Jaccard)
    for i, base in enumerate(bases):
        a = shingles(base, SHINGLE)
        for _ in range(args.variants):
            b = shingles(variant(base, bases[(i + 1) % len(bases)], rng), SHINGLE)
            pairs.append((list(a), list(b), len(a & b) / len(a | b)))
    exact = np.array([j for _, _, j in pairs])
    pos, neg = exact >= THRESHOLD + 0.05, exact < THRESHOLD - 0.05
    rows = NUM_PERM // BANDS

    lines += [
        f"Throughput corpus: {len(fi_texts)} Finnish pages, {size:.2f} MB, {n_sh:,} distinct "
        f"shingles. Quality: {len(bases)} bases x {args.variants} variants = {len(pairs)} pairs "
        f"({int(pos.sum())} with Jaccard >= {THRESHOLD + 0.05:.2f}, {int(neg.sum())} below "
        f"{THRESHOLD - 0.05:.2f}; exact Jaccard mean {exact.mean():.3f}).",
        "",
        "| step | docs/s | MB/s (one core) | MAE of Jaccard estimate | bias (± 2 SE) | recall "
        "| precision |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| shingling (words, lower, 5-grams, set) | {len(fi_texts) / t_sh:,.0f} "
        f"| {size / t_sh:.2f} | | | | |",
    ]
    for name, (one, batch) in signers(versions).items():
        if batch is not None:
            t = best(lambda batch=batch: batch(shingle_lists), args.repeat)
            sa = np.array(batch([a for a, _, _ in pairs]), dtype=np.uint64)
            sb = np.array(batch([b for _, b, _ in pairs]), dtype=np.uint64)
        else:
            t = best(lambda one=one: [one(s) for s in shingle_lists], args.repeat)
            sa = np.array([np.asarray(one(a), dtype=np.uint64) for a, _, _ in pairs])
            sb = np.array([np.asarray(one(b), dtype=np.uint64) for _, b, _ in pairs])
        eq = sa == sb
        est = eq.mean(axis=1)
        collide = eq.reshape(len(pairs), BANDS, rows).all(axis=2).any(axis=1)
        found = collide & (est >= THRESHOLD)
        tp, fp = int((found & pos).sum()), int((found & neg).sum())
        lines.append(
            f"| {name} | {len(fi_texts) / t:,.0f} | {size / t:.2f} "
            f"| {np.abs(est - exact).mean():.4f} "
            f"| {(est - exact).mean():+.4f} ± {2 * (est - exact).std() / len(pairs) ** 0.5:.4f} "
            f"| {tp / max(1, pos.sum()):.3f} | {tp / max(1, tp + fp):.3f} |"
        )
    return lines


# ---------------------------------------------------------------- language identification


def marker_filter(text: str, lang: str) -> str:
    """TEXT's paragraphs that look like LANG by marker words (see the module docstring)."""
    kept = []
    others = set().union(*(m for k, m in MARKERS.items() if k not in (lang, "en")))
    for para in text.split("\n\n"):
        ws = [w.lower() for w in words(para)]
        own = sum(w in MARKERS[lang] for w in ws)
        foreign = sum(w in (others if lang == "en" else MARKERS["en"]) for w in ws)
        if own >= 2 and own >= 3 * foreign:
            kept.append(para)
    return "\n\n".join(kept)


def langid_data(args) -> dict[str, list[str]]:
    dirs = {lang: f"{GIMP_HELP}/{lang}" for lang in ("sv", "en", "de")}
    dirs.update(dict(kv.split("=", 1) for kv in args.lang_dir))
    data = {}
    for lang in LANGS:
        if lang == "fi":
            texts = sample_texts()
        elif lang in dirs:
            texts = html_texts(dirs[lang])
        else:
            print(
                f"note: no text for {lang} (pass --lang-dir {lang}=DIR); skipped", file=sys.stderr
            )
            texts = None
        if texts:
            kept = [f for t in texts if len(f := marker_filter(t, lang)) >= 200]
            data[lang] = spread(kept, args.langid_docs)
    return data


def detectors(versions: dict) -> dict:
    """{name: factory returning a function text -> ISO 639-1 code or "none"}."""
    out = {}
    if versions.get("py3langid"):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        def py3(langs):
            def make():
                ident = LanguageIdentifier.from_model_file(MODEL_FILE)
                if langs:
                    ident.set_languages(langs)
                return lambda text: ident.classify(text)[0]

            return make

        out[f"py3langid {versions['py3langid']}, all languages"] = py3(None)
        out[f"py3langid {versions['py3langid']}, restricted"] = py3(RESTRICTED)
    if versions.get("lingua"):
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        def lin(restricted, low):
            def make():
                if restricted:
                    codes = [getattr(IsoCode639_1, c.upper()) for c in RESTRICTED if c != "no"]
                    builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes, IsoCode639_1.NB)
                else:
                    builder = LanguageDetectorBuilder.from_all_languages()
                if low:
                    builder = builder.with_low_accuracy_mode()
                det = builder.build()

                def detect(text):
                    r = det.detect_language_of(text)
                    return r.iso_code_639_1.name.lower() if r is not None else "none"

                detect.unload = det.unload_language_models
                return detect

            return make

        v = versions["lingua"]
        for restricted in (False, True):
            for low in (False, True):
                name = f"lingua {v}, {'restricted' if restricted else 'all languages'}"
                out[f"{name}, {'low' if low else 'high'} accuracy"] = lin(restricted, low)
    return out


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def langid_section(args, versions: dict) -> list[str]:
    data = langid_data(args)
    langs = [lang for lang in LANGS if lang in data]
    counts = ", ".join(f"{lang} {len(data[lang])}" for lang in langs)
    size = mb(t for lang in langs for t in data[lang])
    n_docs = sum(len(data[lang]) for lang in langs)
    cuts = [None, *args.snippets]
    head = "| detector | " + " | ".join(langs) + " | false fi | docs/s | MB/s | load s | +RSS MB |"
    rule = "|---|" + "---:|" * (len(langs) + 5)
    tables = {cut: [head, rule] for cut in cuts}
    wrong: dict[str, Counter] = {}
    for name, make in detectors(versions).items():
        rss0, t0 = rss_mb(), time.perf_counter()
        detect = make()
        for lang in langs:  # lingua loads models lazily, for short texts more of them
            detect(data[lang][0])
            for cut in args.snippets:
                detect(data[lang][0][:cut])
        load, rss = time.perf_counter() - t0, rss_mb() - rss0
        for cut in cuts:
            texts = {lang: [t[:cut] for t in data[lang]] for lang in langs}
            got: dict[str, list[str]] = {}

            def run(texts=texts, got=got, detect=detect):
                got.update({lang: [detect(t) for t in texts[lang]] for lang in langs})

            sec = best(run, 1 if cut is None else args.repeat)
            acc = [sum(g == lang for g in got[lang]) / len(got[lang]) for lang in langs]
            false_fi = sum(g == "fi" for lang in langs if lang != "fi" for g in got[lang])
            negatives = sum(len(got[lang]) for lang in langs if lang != "fi")
            cut_mb = mb(t for lang in langs for t in texts[lang])
            tables[cut].append(
                f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc)
                + f" | {false_fi}/{negatives} | {n_docs / sec:,.0f} | {cut_mb / sec:.2f} "
                f"| {load:.2f} | {rss:.0f} |"
            )  # fmt: skip
            for lang in langs:
                wrong.setdefault(f"{name} ({cut or 'whole'})", Counter()).update(
                    f"{lang}->{g}" for g in got[lang] if g != lang
                )
        getattr(detect, "unload", lambda: None)()
        del detect
    lines = [
        "## Language identification",
        "",
        f"Documents: {counts} ({size:.2f} MB). Restricted set: {', '.join(RESTRICTED)} "
        "(lingua: nb for no). Accuracy per true language; false fi: non-Finnish documents "
        "identified as Finnish; load s and +RSS MB: building the detector and its first calls.",
    ]
    for cut in cuts:
        lines += ["", f"First {cut} characters:" if cut else "Whole documents:", "", *tables[cut]]
    lines += ["", "Errors (true->identified, count; at most 6 kinds):", ""]
    for name, c in wrong.items():
        if c:
            lines.append(f"- {name}: " + ", ".join(f"{k} {n}" for k, n in c.most_common(6)))
    return lines


# ---------------------------------------------------------------- mojibake


def _as_latin1(err: UnicodeDecodeError):
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("bench_latin1", _as_latin1)


def mojibake_section(args, versions: dict, fi_texts: list[str]) -> list[str]:
    nfc = [unicodedata.normalize("NFC", t) for t in fi_texts]
    broken = {
        "cp1252": [t.encode().decode("cp1252", errors="bench_latin1") for t in fi_texts],
        "latin-1": [t.encode().decode("latin-1") for t in fi_texts],
    }
    size = mb(fi_texts)
    fixers = {"unicodedata.normalize('NFC')": lambda t: unicodedata.normalize("NFC", t)}
    if versions.get("ftfy"):
        import ftfy

        fixers[f"ftfy {versions['ftfy']} fix_text(normalization='NFC')"] = lambda t: ftfy.fix_text(
            t, normalization="NFC"
        )
        fixers[f"ftfy {versions['ftfy']} fix_text(normalization='NFC', uncurl_quotes=False)"] = (
            lambda t: ftfy.fix_text(t, normalization="NFC", uncurl_quotes=False)
        )
        fixers[f"ftfy {versions['ftfy']} as above where `ftfy.badness.is_bad`, else NFC alone"] = (
            lambda t: (
                ftfy.fix_text(t, normalization="NFC", uncurl_quotes=False)
                if ftfy.badness.is_bad(t)
                else unicodedata.normalize("NFC", t)
            )
        )
    hit = {k: [i for i, (b, t) in enumerate(zip(bs, fi_texts, strict=True)) if b != t]
           for k, bs in broken.items()}  # fmt: skip
    lines = [
        "## Mojibake repair",
        "",
        f"{len(fi_texts)} Finnish pages, {size:.2f} MB; each made into cp1252 and Latin-1 "
        f"mojibake, which changes {len(hit['cp1252'])} pages (those with non-ASCII text): the "
        "pages over which repair is counted.",
        "",
        "| step | MB/s clean (one core) | MB/s mojibake (cp1252) | clean unchanged "
        "| cp1252 repaired | Latin-1 repaired |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, fix in fixers.items():
        t_clean = best(lambda fix=fix: [fix(t) for t in fi_texts], args.repeat)
        t_moj = best(lambda fix=fix: [fix(t) for t in broken["cp1252"]], args.repeat)
        clean = [fix(t) for t in fi_texts]
        fixed = {k: {i: fix(bs[i]) for i in hit[k]} for k, bs in broken.items()}
        unchanged = sum(f == n for f, n in zip(clean, nfc, strict=True)) / len(nfc)
        repaired = {k: sum(f == nfc[i] for i, f in fixed[k].items()) / len(hit[k]) for k in hit}
        lines.append(
            f"| {name} | {size / t_clean:.2f} | {mb(broken['cp1252']) / t_moj:.2f} "
            f"| {unchanged:.3f} | {repaired['cp1252']:.3f} | {repaired['latin-1']:.3f} |"
        )
        changed: Counter = Counter()
        for f, n in zip(clean, nfc, strict=True):
            if f != n:
                changed.update((Counter(n) - Counter(f)).keys())
        if changed:
            same = {k: sum(f == clean[i] for i, f in fixed[k].items()) / len(hit[k]) for k in hit}
            notes.append(
                f"- {name} changes clean text in {round((1 - unchanged) * len(nfc))} "
                "pages; characters it replaces (pages): "
                + ", ".join(f"{ch!r} U+{ord(ch):04X} {n}" for ch, n in changed.most_common(6))
                + ". Mojibake repaired to what it makes of the clean page: "
                + ", ".join(f"{k} {v:.3f}" for k, v in same.items())
                + "."
            )
    return lines + ([""] + notes if notes else [])


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fi-dir", default=DEFAULT_INPUT_DIR, help="Finnish HTML manual")
    p.add_argument("--lang-dir", action="append", default=[], metavar="LANG=DIR",
                   help=f"HTML pages of LANG (default sv/en/de: {GIMP_HELP}/LANG)")  # fmt: skip
    p.add_argument("--bases", type=int, default=300)
    p.add_argument("--variants", type=int, default=3)
    p.add_argument("--langid-docs", type=int, default=200)
    p.add_argument("--snippets", type=int, nargs="*", default=[100, 30],
                   help="also classify each document's first N characters")  # fmt: skip
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["minhash", "langid", "mojibake"], action="append")
    p.add_argument("--record", default=None)
    args = p.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    versions = {
        "datasketch": available("datasketch"),
        "rensa": available("rensa"),
        "datatrove": available("datatrove"),
        "py3langid": available("py3langid"),
        "lingua": available("lingua", "lingua-language-detector"),
        "ftfy": available("ftfy"),
    }
    fi_texts = html_texts(args.fi_dir) or sample_texts()
    sections = args.only or ["minhash", "langid", "mojibake"]
    found = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
    missing = [k for k, v in versions.items() if not v]
    lines = [
        f"Python {sys.version.split()[0]}, one core; {found}"
        + (f"; not importable: {', '.join(missing)}" if missing else ""),
    ]
    if "minhash" in sections:
        lines += ["", *minhash_section(args, versions, fi_texts)]
    if "langid" in sections:
        lines += ["", *langid_section(args, versions)]
    if "mojibake" in sections:
        lines += ["", *mojibake_section(args, versions, fi_texts)]
    finish(lines, "curate_libraries.py", args.record, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
