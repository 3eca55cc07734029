"""The curation config (`curate.yaml`): one section per step, Finnish defaults, every threshold
documented here. A step whose `enabled` is false is skipped; unknown keys and impossible
thresholds are refused before any work (`validate`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext import config as config_io
from megatron_ext.errors import UserError


@dataclass
class NormaliseConfig:
    enabled: bool = True
    nfc: bool = True  # Unicode NFC
    fix_mojibake: bool = True  # ftfy: UTF-8 read as Latin-1/cp1252 ("Ã¤" -> "ä") and the like
    whitespace: bool = True  # trailing spaces cut, runs of blank lines made one


@dataclass
class ExactDedupConfig:
    enabled: bool = True  # documents whose normalised text is identical: the first kept
    lines: bool = True  # CCNet-style boilerplate removal of repeated lines
    # a line (stripped, at least min_line_chars long) found in more than this many distinct
    # documents (texts) is boilerplate (menus, cookie banners, "Tämä sivu ...") and removed
    # from every document
    max_line_documents: int = 10
    min_line_chars: int = 10
    # a document left with fewer than this share of its characters is removed as boilerplate
    min_kept_fraction: float = 0.2


@dataclass
class NearDedupConfig:
    enabled: bool = True
    shingle_words: int = 5  # word n-grams
    num_perm: int = 128  # MinHash permutations
    bands: int = 16  # LSH bands (num_perm / bands rows each)
    threshold: float = 0.8  # estimated Jaccard similarity of a duplicate pair
    # true: a pair sharing a band is a duplicate only if its signatures' estimated Jaccard is at
    # least `threshold`; false: any shared band makes a duplicate (datatrove's and most LSH
    # pipelines' rule: an effective threshold of (1/bands)^(1/rows), 0.71 at 16 x 8, and pairs
    # far below it joined too: see benchmarks/results/curate_datatrove.md)
    verify: bool = True
    seed: int = 1


@dataclass
class QualityConfig:
    """Gopher (Rae et al. 2021) / C4 rules; the word-level ones with Finnish parameters (long
    compound words: a higher mean word length than English)."""

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 14.0
    max_symbol_ratio: float = 0.1  # '#' and '...' per word
    max_digit_ratio: float = 0.2  # digits per character
    max_ellipsis_lines: float = 0.3  # share of lines ending in ... or …
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet
    max_duplicate_lines: float = 0.3  # share of lines repeated inside the document
    max_duplicate_ngram_chars: float = 0.2  # share of characters in repeated word 5-grams
    # at least this many distinct common Finnish function words (Gopher's stop-word rule)
    min_function_words: int = 2
    function_words: list[str] = field(
        default_factory=lambda: [
            "ja", "on", "ei", "se", "että", "oli", "kun", "mutta", "tai", "ovat", "sen",
            "myös", "jos", "niin", "kuin", "voi", "tämä", "joka", "ole", "vain",
        ]
    )  # fmt: skip


@dataclass
class LanguageConfig:
    enabled: bool = True
    language: str = "fi"  # ISO 639-1, as py3langid (shipped model, no download)
    min_score: float = 0.65  # the document's probability of `language`
    # a document is reported as mixed when its paragraphs' languages differ (report only)
    report_mixed: bool = True


@dataclass
class PiiConfig:
    enabled: bool = True
    email: str = "<EMAIL>"
    phone: str = "<PHONE>"
    ip: str = "<IP>"
    iban: str = "<IBAN>"
    hetu: str = "<HETU>"  # Finnish personal identity code (henkilötunnus), control-checked


@dataclass
class DecontaminateConfig:
    enabled: bool = True
    ngram_words: int = 13
    # directories of evaluation data: BIG-bench task.json files and lm-eval JSONL/YAML task data;
    # empty: the tasks bundled with megatron-ext
    task_dirs: list[str] = field(default_factory=list)


@dataclass
class CurateConfig:
    text_key: str = "text"
    id_key: str = "id"
    shard_documents: int = 100_000  # documents per output shard
    # memory and parallelism (not the result): input files are read in parts of about this
    # many MB (a file is never split: give a large corpus as several files), and the hashes
    # are sorted in buckets of about this many MB of input each
    part_mb: float = 64
    bucket_mb: float = 128
    normalise: NormaliseConfig = field(default_factory=NormaliseConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    near_dedup: NearDedupConfig = field(default_factory=NearDedupConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)

    def validate(self) -> None:
        n, q = self.near_dedup, self.quality
        checks = [
            (self.shard_documents >= 1, "shard_documents must be >= 1"),
            (self.part_mb > 0 and self.bucket_mb > 0, "part_mb and bucket_mb must be > 0"),
            (0 < n.threshold <= 1, f"near_dedup.threshold={n.threshold} must be in (0, 1]"),
            (
                n.num_perm >= 2 and n.bands >= 1 and n.num_perm % n.bands == 0,
                f"near_dedup: num_perm={n.num_perm} must be a multiple of bands={n.bands}",
            ),
            (n.shingle_words >= 1, "near_dedup.shingle_words must be >= 1"),
            (
                0 <= q.min_words <= q.max_words,
                f"quality: min_words={q.min_words} must be <= max_words={q.max_words}",
            ),
            (
                0 <= q.min_mean_word_length <= q.max_mean_word_length,
                "quality: min_mean_word_length must be <= max_mean_word_length",
            ),
            (0 <= self.language.min_score <= 1, "language.min_score must be in [0, 1]"),
            (self.decontaminate.ngram_words >= 1, "decontaminate.ngram_words must be >= 1"),
            (
                self.exact_dedup.max_line_documents >= 1,
                "exact_dedup.max_line_documents must be >= 1",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise UserError(f"curate config: {what}")
        for ratio in ("max_symbol_ratio", "max_digit_ratio", "max_ellipsis_lines",
                      "max_bullet_lines", "max_duplicate_lines", "max_duplicate_ngram_chars"):  # fmt: skip
            if not 0 <= getattr(q, ratio) <= 1:
                raise UserError(f"curate config: quality.{ratio} must be in [0, 1]")
        for d in self.decontaminate.task_dirs:
            if not Path(d).is_dir():
                raise UserError(f"curate config: decontaminate.task_dirs: {d} is not a directory")


def load(path: str | None) -> CurateConfig:
    """The config at PATH (defaults without one), validated."""
    data = config_io.read_yaml(path) if path else {}
    cfg = config_io.from_dict(CurateConfig, data, where=str(path or "curate config"))
    cfg.validate()
    return cfg
