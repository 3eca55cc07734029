"""Weighted blends of indexed datasets into one deterministic stream of GPT samples.

A blend is a list of sources, from YAML

    - {path: /data/fi/wiki, upsample: 3, name: wiki}
    - {path: /data/fi/news, upsample: 2}
    - {path: /data/fi/web,  upsample: 1}

or Megatron's `--data-path 0.3 /data/a 0.7 /data/b`. A source gives either `weight` (its target
fraction of the sample stream, normalised over the blend) or `upsample` (FinGPT's factor: seen
that many times as often per token as a source of factor 1, so the weight is tokens x factor);
a blend without either weights its sources by their token counts. Token counts are those of the
whole dataset, so every split uses the same weights.

Global sample t comes from source `source_index[t]`, sample `sample_in_source[t]` of it
(Tijdeman's algorithm, see `index_helpers.build_blending_index`: every source's realised count
is within one sample of its target after any prefix of the stream). Each source then builds
exactly the samples it is asked for (`gpt_dataset`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from megatron_ext.config import short
from megatron_ext.data import index_helpers
from megatron_ext.data.gpt_dataset import (
    INDEX_VERSION,
    SPLITS,
    GPTDataset,
    GPTDatasetConfig,
    document_sizes,
    index_description,
    index_name,
    split_document_ranges,
)
from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

MAX_GOOD_EPOCHS = 4.0  # past ~4 repetitions repeated tokens lose most of their value
_KEYS = {"path", "weight", "upsample", "name", "vocab_size"}


def _refuse_duplicates(sources: list, origin) -> None:
    """The same dataset listed twice would be drawn twice while the table shows each half's
    epochs: give it once, with the summed weight (or the upsample factor you mean)."""
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        key = os.path.realpath(src.path)
        if key in seen:
            raise UserError(
                f"{origin}: entries {seen[key] + 1} and {i + 1} are the same dataset "
                f"({src.path}); list it once, with the summed weight or one upsample factor"
            )
        seen[key] = i


@dataclass(frozen=True)
class BlendSource:
    path: str
    weight: float | None = None
    upsample: float | None = None
    name: str = ""
    vocab_size: int | None = None  # when known: sources with different vocabularies are refused


@dataclass
class BlendConfig:
    sources: list[BlendSource]
    origin: str = "blend"  # where it came from, for error messages

    def __post_init__(self) -> None:
        if not self.sources:
            raise UserError(f"{self.origin}: the blend lists no sources")
        kinds = {(s.weight is not None, s.upsample is not None) for s in self.sources}
        for i, s in enumerate(self.sources):
            where = f"{self.origin}: source {i + 1} ({s.path})"
            if s.weight is not None and s.upsample is not None:
                raise UserError(f"{where}: give either weight or upsample, not both")
            for key in ("weight", "upsample"):
                value = getattr(s, key)
                if value is not None and (not math.isfinite(value) or value < 0):
                    raise UserError(f"{where}: {key} must be a finite number >= 0 (got {value})")
        if len(kinds) > 1:
            raise UserError(
                f"{self.origin}: give every source a weight, or every source an upsample factor, "
                "or none (weights by token counts); the blend mixes them"
            )
        values = [s.weight if s.weight is not None else s.upsample for s in self.sources]
        if all(v is not None for v in values) and sum(values) <= 0:
            raise UserError(f"{self.origin}: all weights are zero; at least one must be positive")
        names = [s.name or os.path.basename(s.path) for s in self.sources]
        for i, n in enumerate(names):  # default names must be unique (cache entries, tables)
            if names.count(n) > 1:
                names[i] = f"{n}#{i + 1}"
        self.sources = [
            BlendSource(**{**asdict(s), "name": n})
            for s, n in zip(self.sources, names, strict=True)
        ]

    @classmethod
    def from_prefix(cls, prefix: str) -> BlendConfig:
        return cls([BlendSource(path=prefix, weight=1.0)], origin=prefix)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> BlendConfig:
        """A YAML list of `{path, weight | upsample, name, vocab_size}`; relative paths are
        resolved against the YAML file's directory."""
        from megatron_ext.config import MAX_YAML_BYTES, load_yaml

        path = os.fspath(path)
        try:
            if os.path.getsize(path) > MAX_YAML_BYTES:
                raise UserError(f"{path}: a blend file is at most {MAX_YAML_BYTES} bytes")
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise UserError(f"{path}: cannot read the blend file ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        entries = load_yaml(text, f"{path} (blend)")
        if not isinstance(entries, list):
            raise UserError(
                f"{path}: expected a YAML list of sources like '- {{path: P, weight: W}}'"
            )
        base = os.path.dirname(os.path.abspath(path))
        sources = []
        for i, entry in enumerate(entries):
            where = f"{path}: entry {i + 1}"
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise UserError(f"{where}: expected a mapping with a 'path' (got {short(entry)})")
            unknown = set(entry) - _KEYS
            if unknown:
                raise UserError(
                    f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}"
                )
            for key in ("weight", "upsample", "vocab_size"):
                if isinstance(entry.get(key), bool):  # YAML true/false: float(True) is 1.0
                    raise UserError(f"{where}: {key} must be a number, got {short(entry[key])}")
            try:
                sources.append(
                    BlendSource(
                        path=os.path.join(base, os.path.expanduser(entry["path"])),
                        weight=None if entry.get("weight") is None else float(entry["weight"]),
                        upsample=None
                        if entry.get("upsample") is None
                        else float(entry["upsample"]),
                        name=str(entry.get("name") or ""),
                        vocab_size=None
                        if entry.get("vocab_size") is None
                        else int(entry["vocab_size"]),
                    )
                )
            except (TypeError, ValueError):
                raise UserError(
                    f"{where}: weight, upsample and vocab_size must be numbers"
                ) from None
        _refuse_duplicates(sources, path)
        return cls(sources, origin=path)

    @classmethod
    def from_data_path(cls, items: Sequence[str]) -> BlendConfig:
        """Megatron's `--data-path`: `W1 P1 W2 P2 ...`, or prefixes only (weights by tokens)."""
        items = list(items)
        if not items:
            raise UserError("--data-path: no datasets given")
        if not _is_number(items[0]):
            if any(_is_number(x) for x in items):
                raise UserError("--data-path: give a weight before every prefix, or no weights")
            return cls([BlendSource(path=p) for p in items], origin="--data-path")
        if len(items) % 2 or not all(_is_number(w) for w in items[::2]):
            raise UserError(
                "--data-path: expected weight/prefix pairs like '0.3 /data/a 0.7 /data/b'"
            )
        sources = [
            BlendSource(path=p, weight=float(w))
            for w, p in zip(items[::2], items[1::2], strict=True)
        ]
        return cls(sources, origin="--data-path")

    def target_weights(self, total_tokens: Sequence[int]) -> np.ndarray:
        """Normalised target fraction of each source; upsampling factors are weighted by tokens."""
        first = self.sources[0]
        if first.weight is not None:
            raw = np.array([s.weight for s in self.sources], dtype=np.float64)
        else:
            factors = [1.0 if s.upsample is None else s.upsample for s in self.sources]
            raw = np.array(factors, dtype=np.float64) * np.asarray(total_tokens, dtype=np.float64)
        if raw.sum() <= 0:
            raise UserError(f"{self.origin}: every source with a positive factor is empty")
        return raw / raw.sum()


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@dataclass
class SourcePlan:
    name: str
    path: str
    tokens: int  # in this split
    weight: float  # target fraction of the stream
    samples: int = 0
    fraction: float = 0.0  # realised fraction
    epochs: float = 0.0  # passes over this split's tokens
    documents: tuple[int, int] = (0, 0)
    cache_path: str | None = None


@dataclass
class BlendPlan:
    split: str
    seq_length: int
    num_samples: int
    sources: list[SourcePlan] = field(default_factory=list)
    cache_path: str | None = None  # the blending index's cache entry

    def table(self) -> str:
        head = (
            f"{'source':<24}{'tokens':>16}{'weight':>9}{'samples':>14}{'realised':>10}{'epochs':>8}"
        )
        rows = [
            f"blend, {self.split} split: {self.num_samples:,} samples of {self.seq_length} tokens",
            head,
        ]
        for s in self.sources:
            rows.append(
                f"{s.name[:23]:<24}{s.tokens:>16,}{s.weight:>9.4f}{s.samples:>14,}"
                f"{s.fraction:>10.4f}{s.epochs:>8.2f}"
            )
        return "\n".join(rows)

    def warnings(self) -> list[str]:
        """Sources repeated more than MAX_GOOD_EPOCHS times in this split."""
        return [
            f"{s.name}: {s.epochs:.1f} epochs over its {self.split} split ({s.tokens:,} tokens); "
            f"beyond ~{MAX_GOOD_EPOCHS:.0f} repeated data loses most of its value"
            for s in self.sources
            if s.epochs > MAX_GOOD_EPOCHS
        ]

    def to_json(self) -> dict:
        keys = ("name", "path", "tokens", "weight", "samples", "fraction", "epochs", "cache_path")
        return {
            "split": self.split,
            "seq_length": self.seq_length,
            "num_samples": self.num_samples,
            "cache_path": self.cache_path,
            "sources": [{k: getattr(s, k) for k in keys} for s in self.sources],
            "warnings": self.warnings(),
        }


class BlendedDataset:
    """Global sample t = sample `sample_in_source[t]` of source `source_index[t]`.

    `ds[t]` -> the source's dict (int64 `tokens`, `labels` of seq_length). Picklable cheaply.
    """

    def __init__(self, datasets, source_index, sample_in_source, plan: BlendPlan):
        self.datasets, self.plan = datasets, plan
        self.source_index, self.sample_in_source = source_index, sample_in_source

    def __len__(self) -> int:
        return int(self.source_index.size)

    def __getitem__(self, t: int) -> dict[str, np.ndarray]:
        t = int(t)
        if not 0 <= t < len(self):
            raise IndexError(f"sample {t} out of range (0..{len(self) - 1})")
        return self.datasets[int(self.source_index[t])][int(self.sample_in_source[t])]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.plan.cache_path is not None:
            del state["source_index"], state["sample_in_source"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.plan.cache_path is not None:
            for key in ("source_index", "sample_in_source"):
                setattr(
                    self,
                    key,
                    np.load(os.path.join(self.plan.cache_path, f"{key}.npy"), mmap_mode="r"),
                )


@dataclass
class OpenSource:
    """A blend source with its dataset open and its document sizes read (done once per run)."""

    spec: BlendSource
    indexed: IndexedDataset
    sizes: np.ndarray  # tokens per document

    def split_range(self, split: str, config: GPTDatasetConfig) -> tuple[int, int]:
        return split_document_ranges(self.indexed.num_documents, config.split)[split]


def open_blend(blend: BlendConfig) -> list[OpenSource]:
    """Open every source; refuse missing prefixes, mixed dtypes and differing vocabularies."""
    datasets = [IndexedDataset(s.path) for s in blend.sources]  # a missing prefix fails here
    dtypes = {str(ds.dtype) for ds in datasets}
    if len(dtypes) > 1:
        listed = ", ".join(
            f"{s.name} ({ds.dtype})" for s, ds in zip(blend.sources, datasets, strict=True)
        )
        raise UserError(
            f"{blend.origin}: the sources were tokenized into different dtypes ({listed}): "
            "different tokenizers; re-tokenize them with one tokenizer"
        )
    vocabs = {s.vocab_size for s in blend.sources if s.vocab_size is not None}
    if len(vocabs) > 1:
        listed = ", ".join(f"{s.name}: {s.vocab_size}" for s in blend.sources if s.vocab_size)
        raise UserError(f"{blend.origin}: the sources have different vocabularies ({listed})")
    return [
        OpenSource(s, ds, document_sizes(ds)) for s, ds in zip(blend.sources, datasets, strict=True)
    ]


def check_split(
    blend: BlendConfig,
    sources: list[OpenSource],
    split: str,
    num_samples: int,
    config: GPTDatasetConfig,
) -> BlendPlan:
    """The plan of one split without sample counts; refuses a split that leaves a source with
    positive weight without tokens while samples are asked. Builds nothing."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if num_samples < 0:
        raise UserError(f"the number of samples must be >= 0 (got {num_samples})")
    weights = blend.target_weights([src.indexed.num_tokens for src in sources])
    plan = BlendPlan(split, config.seq_length, int(num_samples))
    for src, w in zip(sources, weights, strict=True):
        begin, end = src.split_range(split, config)
        tokens = int(np.sum(src.sizes[begin:end], dtype=np.int64))
        if w > 0 and num_samples > 0 and tokens == 0:
            raise UserError(
                f"{src.spec.path}: split {config.split!r} leaves its {split} split without tokens "
                f"(documents {begin}..{end - 1} of {src.indexed.num_documents}) but "
                f"{num_samples} samples are asked of the blend; change the split, or give this "
                "source weight 0"
            )
        plan.sources.append(
            SourcePlan(src.spec.name, src.spec.path, tokens, float(w), documents=(begin, end))
        )
    return plan


def plan_blend(
    blend: BlendConfig,
    split: str,
    num_samples: int,
    config: GPTDatasetConfig,
    sources: list[OpenSource] | None = None,
    write_cache: bool = True,
) -> tuple[BlendPlan, tuple[np.ndarray, np.ndarray] | None]:
    """Check everything, then decide how many samples each source gives.

    Returns the plan and the (source_index, sample_in_source) arrays (None for one source).
    Only the blending index is built (and cached unless `write_cache` is False); the
    sources' indices are not.
    """
    sources = open_blend(blend) if sources is None else sources
    plan = check_split(blend, sources, split, num_samples, config)
    weights = np.array([s.weight for s in plan.sources])
    arrays, counts = _blending_index(weights, plan, config, write_cache)
    cache = config.index_cache()
    for s, count in zip(plan.sources, counts, strict=True):
        s.samples = int(count)
        s.fraction = count / num_samples if num_samples else 0.0
        s.epochs = count * config.seq_length / s.tokens if s.tokens else 0.0
        if count and cache is not None:
            description = index_description(s.path, split, s.documents, s.samples, config)
            s.cache_path = str(cache.entry_path(index_name(s.name, split), description))
    return plan, arrays


def _blending_index(
    weights: np.ndarray, plan: BlendPlan, config: GPTDatasetConfig, write_cache: bool = True
):
    if len(weights) == 1 or plan.num_samples == 0:
        return None, [plan.num_samples if w > 0 else 0 for w in weights]
    description = {
        "kind": "blend",
        "version": INDEX_VERSION,
        "weights": [float(w) for w in weights],
        "num_samples": plan.num_samples,
    }

    def build() -> dict[str, np.ndarray]:
        source, sample, counts = index_helpers.build_blending_index(weights, plan.num_samples)
        return {"source_index": source, "sample_in_source": sample, "counts": counts}

    cache, name = config.index_cache(), f"blend-{plan.split}"
    if cache is None:
        arrays = build()
    elif not write_cache:
        arrays = cache.load(name, description) or build()
        plan.cache_path = str(cache.entry_path(name, description))
    else:
        result = cache.load_or_build(name, description, build)
        arrays, plan.cache_path = result.arrays, str(result.path)
    return (arrays["source_index"], arrays["sample_in_source"]), np.asarray(arrays["counts"])


def log_plan(plan: BlendPlan) -> None:
    log.info(plan.table())
    for warning in plan.warnings():
        log.warning(warning)


def build_blended_dataset(
    blend: BlendConfig,
    split: str,
    num_samples: int,
    config: GPTDatasetConfig,
    sources: list[OpenSource] | None = None,
) -> BlendedDataset | GPTDataset | None:
    """One split of a blend: a GPTDataset for one source, else a BlendedDataset; None for 0."""
    if num_samples == 0:
        return None
    sources = open_blend(blend) if sources is None else sources
    plan, arrays = plan_blend(blend, split, num_samples, config, sources)
    log_plan(plan)
    datasets = [
        GPTDataset(
            s.path,
            split,
            s.documents,
            s.samples,
            config,
            name=s.name,
            indexed=src.indexed,
            sizes=src.sizes,
        )
        if s.samples
        else None
        for s, src in zip(plan.sources, sources, strict=True)
    ]
    if arrays is None:
        return datasets[0]
    return BlendedDataset(datasets, arrays[0], arrays[1], plan)


def build_datasets(
    blend: BlendConfig | str | Sequence[str],
    seq_length: int,
    num_samples: Sequence[int] | Mapping[str, int],
    *,
    split: str = "969,30,1",
    seed: int = 1234,
    cache_dir: str | None = None,
    lock_timeout: float | None = None,
) -> tuple:
    """(train, valid, test) datasets of a blend, blend YAML path, prefix or --data-path list.

    num_samples: per split, as a (train, valid, test) triple or a mapping; 0 gives None.
    Every rank may call this: one process per cache directory builds, the others wait on a
    file lock (no collective), and all load the same memory-mapped indices.
    """
    blend = as_blend(blend)
    if isinstance(num_samples, Mapping):
        unknown = set(num_samples) - set(SPLITS)
        if unknown:
            raise UserError(f"num_samples: unknown splits {sorted(unknown)}")
        counts = [int(num_samples.get(s, 0)) for s in SPLITS]
    else:
        counts = [int(n) for n in num_samples]
    if len(counts) != 3:
        raise UserError(f"num_samples: expected three counts (train, valid, test), got {counts}")
    config = GPTDatasetConfig(seq_length, seed, split, cache_dir, lock_timeout)
    sources = open_blend(blend)
    for name, n in zip(
        SPLITS, counts, strict=True
    ):  # every split checked before any index is built
        check_split(blend, sources, name, n, config)
    return tuple(
        build_blended_dataset(blend, name, n, config, sources)
        for name, n in zip(SPLITS, counts, strict=True)
    )


def as_blend(blend: BlendConfig | str | Sequence[str]) -> BlendConfig:
    """A BlendConfig from itself, a `.yaml`/`.yml` path, a dataset prefix or a --data-path list."""
    if isinstance(blend, BlendConfig):
        return blend
    if isinstance(blend, (str, os.PathLike)):
        text = os.fspath(blend)
        if text.endswith((".yaml", ".yml")):
            return BlendConfig.from_yaml(text)
        return BlendConfig.from_prefix(text)
    return BlendConfig.from_data_path([str(x) for x in blend])
