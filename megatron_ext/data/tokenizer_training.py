"""`megatron-ext train-tokenizer`: train a byte-level BPE or a SentencePiece unigram tokenizer.

- `bpe`: byte-level BPE with Hugging Face `tokenizers` (ByteLevel pre-tokenizer and decoder,
  no normaliser, like FinGPT and BLOOM): every text round-trips exactly, nothing is unknown.
  Writes `tokenizer.json`, plus `tokenizer_config.json` and `special_tokens_map.json` so
  `transformers.AutoTokenizer.from_pretrained(DIR)` loads it offline.
- `unigram`: SentencePiece unigram with byte fallback and identity normalisation (texts
  round-trip). Writes `tokenizer.model` (and the human-readable `tokenizer.vocab`).

Both write `megatron_ext_tokenizer.json` naming the special tokens and their ids, which
`megatron_ext.data.tokenizer.load_tokenizer(DIR)` reads for the end-of-document token.
Special tokens take ids 0..n-1 in the order given; the default is FinGPT's:
`<unk>`=0, `<s>`=1 (bos), `</s>`=2 (eos), `<pad>`=3.

Inputs are read as `preprocess` reads them (data/inputs.py, data/records.py): `.jsonl`/`.json`
(text under `--json-key`) and `.txt` files, plain, `.gz` or `.zst`, directories of them and
globs. Texts are streamed; bad records are skipped with a warning naming file and line.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_ext.data.inputs import check_inputs, expand_inputs, iter_chunks
from megatron_ext.data.records import iter_records
from megatron_ext.data.tokenizer import METADATA_FILE, SpecialTokens
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

KINDS = ("bpe", "unigram")
DEFAULT_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
NUM_BYTES = 256  # the byte alphabet (bpe) or byte-fallback pieces (unigram)
MAX_WARNINGS = 5


@dataclass
class TokenizerTrainingConfig:
    """One tokenizer training run; `train_tokenizer` builds and checks it."""

    inputs: list[str]
    vocab_size: int
    output: str
    kind: str = "bpe"
    json_key: str = "text"
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    roles: SpecialTokens = field(default_factory=SpecialTokens)
    min_frequency: int = 2  # bpe only: merges seen fewer times are not learned
    max_sentences: int = 10_000_000  # unigram only: lines SentencePiece samples
    overwrite: bool = False
    show_progress: bool = True

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"--type must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.inputs:
            raise UserError("no --input given")
        specials = self.special_tokens
        if any(not t for t in specials) or len(set(specials)) != len(specials):
            raise UserError(f"--special-tokens must be distinct and non-empty, got {specials}")
        for role, token in asdict(self.roles).items():
            if token is not None and token not in specials:
                raise UserError(
                    f"--{role} token {token!r} is not among --special-tokens {specials}; "
                    f"add it there or pass --{role} none"
                )
        if self.kind == "unigram" and self.roles.unk is None:
            raise UserError("--type unigram needs an --unk token (SentencePiece requires one)")
        minimum = len(specials) + NUM_BYTES + (1 if self.kind == "bpe" else 2)
        if self.vocab_size < minimum:
            raise UserError(
                f"--vocab-size {self.vocab_size} is too small: {len(specials)} special tokens "
                f"and {NUM_BYTES} byte tokens need at least {minimum}"
            )
        if self.min_frequency < 1:
            raise UserError(f"--min-frequency must be at least 1, got {self.min_frequency}")


# ---------------------------------------------------------------------------- reading inputs


def iter_texts(
    inputs: Sequence[str | os.PathLike],
    json_key: str = "text",
    skipped: list[str] | None = None,
    txt_mode: str = "file",
) -> Iterator[str]:
    """Stream the documents of `inputs`, exactly as `preprocess` reads them.

    Inputs are found and opened by data/inputs.py (files, directories, globs; plain, .gz or
    .zst) and parsed by data/records.py, so the tokenizer trains on the documents that
    preprocessing will tokenize. Bad records are skipped and described in `skipped` as
    `file:line: reason`.
    """
    skipped = skipped if skipped is not None else []
    paths = expand_inputs([os.fspath(p) for p in inputs])
    check_inputs(paths)
    for chunk in iter_chunks(paths, txt_mode=txt_mode):
        for line_no, record in iter_records(chunk, json_key):
            if isinstance(record, str):
                yield record
            else:
                skipped.append(f"{chunk.path}:{line_no}: {record.detail}")


class _TextStream:
    """Wraps `iter_texts`, counting what went through; fails early when there is no text."""

    def __init__(self, config: TokenizerTrainingConfig):
        self.skipped: list[str] = []
        self.num_texts = 0
        self.num_chars = 0
        texts = iter_texts(config.inputs, config.json_key, self.skipped)
        first = next(texts, None)
        if first is None:
            self.report_skipped()
            raise UserError(
                f"no input text in {', '.join(map(str, config.inputs))} "
                f"(JSON lines need a non-empty string under {config.json_key!r}; see --json-key)"
            )
        self._texts = itertools.chain([first], texts)

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            self.num_texts += 1
            self.num_chars += len(text)
            yield text

    def lines(self) -> Iterator[str]:
        for text in self:
            yield from (line for line in text.split("\n") if line.strip())

    def report_skipped(self) -> None:
        for reason in self.skipped[:MAX_WARNINGS]:
            log.warning("skipped %s", reason)
        if len(self.skipped) > MAX_WARNINGS:
            log.warning("skipped %d more bad lines", len(self.skipped) - MAX_WARNINGS)


# ---------------------------------------------------------------------------- trainers


def _train_bpe(config: TokenizerTrainingConfig, stream: _TextStream, out_dir: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=config.special_tokens,  # added first: ids 0..n-1 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=config.show_progress,
    )
    tok.train_from_iterator(stream, trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "special_tokens_map.json", _hf_special_tokens(config))
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_hf_special_tokens(config),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # else decode() would change the text
    }
    _write_json(out_dir / "tokenizer_config.json", hf_config)
    return tok.get_vocab_size(with_added_tokens=True)


def _hf_special_tokens(config: TokenizerTrainingConfig) -> dict:
    roles = {f"{role}_token": tok for role, tok in asdict(config.roles).items() if tok is not None}
    extra = [t for t in config.special_tokens if t not in roles.values()]
    return {**roles, **({"additional_special_tokens": extra} if extra else {})}


def _train_unigram(config: TokenizerTrainingConfig, stream: _TextStream, out_dir: Path) -> int:
    import sentencepiece as spm

    specials = config.special_tokens
    roles = asdict(config.roles)
    role_ids = {role: specials.index(tok) if tok else -1 for role, tok in roles.items()}
    role_pieces = {f"{role}_piece": tok for role, tok in roles.items() if tok}
    # SentencePiece places user-defined symbols at the lowest free ids, i.e. at their
    # positions in `specials`; unlike control symbols they are matched in text, as
    # Hugging Face matches added special tokens.
    user_defined = [t for t in specials if t not in roles.values()]
    spm.set_random_generator_seed(0)  # sampling of --max-sentences lines
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=stream.lines(),  # one line per sentence, as for Llama
            model_prefix=str(out_dir / "tokenizer"),
            model_type="unigram",
            vocab_size=config.vocab_size,
            **{f"{role}_id": i for role, i in role_ids.items()},
            **role_pieces,
            user_defined_symbols=user_defined,
            byte_fallback=True,
            # identity + kept whitespace: decode(encode(text)) == text
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            input_sentence_size=config.max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=min(os.cpu_count() or 1, 16),
            minloglevel=0 if config.show_progress else 2,
        )
    except RuntimeError as exc:  # e.g. "Vocabulary size too high (5000). Please set it to..."
        raise UserError(f"SentencePiece training failed: {exc}") from None
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model")).get_piece_size()


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- driver


def _prepare_output(config: TokenizerTrainingConfig) -> tuple[Path, Path]:
    """Check the output before the (long) training; return (output, fresh temp dir)."""
    out = Path(config.output)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not config.overwrite:
            raise UserError(f"{out}: directory exists and is not empty (pass --overwrite)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{out}: cannot create output directory ({exc.strerror or exc})") from None
    return out, tmp


def _publish(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` (renames only; the old directory goes once the new one is in)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def resolve_roles(
    special_tokens: Sequence[str],
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    unk: str | None = None,
) -> SpecialTokens:
    """Special-token roles: a given token, "none" for no such token, or (None) the default
    token (`<s>`, `</s>`, `<pad>`, `<unk>`) when it is among `special_tokens`."""
    given = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    roles = {}
    for role, default in asdict(SpecialTokens()).items():
        value = given[role]
        if value is None:
            value = default if default in special_tokens else None
        elif value.lower() == "none":
            value = None
        roles[role] = value
    return SpecialTokens(**roles)


def train_tokenizer(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    vocab_size: int,
    output: str | os.PathLike,
    kind: str = "bpe",
    *,
    json_key: str = "text",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    roles: SpecialTokens | None = None,
    min_frequency: int = 2,
    max_sentences: int = 10_000_000,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Path:
    """Train a `kind` ("bpe" or "unigram") tokenizer on `inputs`; return the output directory.

    `special_tokens` get ids 0..n-1 in order; `roles` says which is bos/eos/pad/unk
    (default: `resolve_roles(special_tokens)`). The directory appears only when complete.
    Raises UserError for missing or empty inputs, a too small vocabulary, or an unwritable
    or non-empty output.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    specials = list(special_tokens)
    config = TokenizerTrainingConfig(
        inputs=[os.fspath(p) for p in inputs],
        vocab_size=vocab_size,
        output=os.fspath(output),
        kind=kind,
        json_key=json_key,
        special_tokens=specials,
        roles=roles if roles is not None else resolve_roles(specials),
        min_frequency=min_frequency,
        max_sentences=max_sentences,
        overwrite=overwrite,
        show_progress=show_progress,
    )
    return run_training(config)


def run_training(config: TokenizerTrainingConfig) -> Path:
    """`train_tokenizer` for a ready config."""
    config.validate()
    if config.roles.eos is None:
        log.warning("no eos token: documents will have no end-of-document id (see --eos)")
    stream = _TextStream(config)  # reads up to the first text: input errors come before output
    out, tmp = _prepare_output(config)
    try:
        log.info(
            "training %s tokenizer, vocab %d, on %s",
            config.kind,
            config.vocab_size,
            ", ".join(config.inputs),
        )
        train = _train_bpe if config.kind == "bpe" else _train_unigram
        vocab_size = train(config, stream, tmp)
        stream.report_skipped()
        _write_json(tmp / METADATA_FILE, _metadata(config, vocab_size, stream))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if vocab_size < config.vocab_size:
        log.warning(
            "%s: vocabulary has %d entries, fewer than the %d asked (small corpus)",
            out,
            vocab_size,
            config.vocab_size,
        )
    log.info(
        "%s: %s tokenizer, vocab %d, from %d texts (%d chars)",
        out,
        config.kind,
        vocab_size,
        stream.num_texts,
        stream.num_chars,
    )
    return out


def _metadata(config: TokenizerTrainingConfig, vocab_size: int, stream: _TextStream) -> dict:
    roles = asdict(config.roles)
    ids = {f"{r}_id": config.special_tokens.index(t) if t else None for r, t in roles.items()}
    return {
        "type": config.kind,
        "vocab_size": vocab_size,
        **roles,
        **ids,
        "special_tokens": config.special_tokens,
        "requested_vocab_size": config.vocab_size,
        "inputs": config.inputs,
        "num_texts": stream.num_texts,
        "skipped_lines": len(stream.skipped),
    }
