"""Tokenizers the data tools accept, behind one small interface.

Accepted forms of `path`:
- a Hugging Face `tokenizer.json` file (byte-level BPE like FinGPT's, or any other model);
- a SentencePiece `.model` file;
- a directory holding either of those, such as one written by `megatron-ext train-tokenizer`
  (which adds `megatron_ext_tokenizer.json` naming the special tokens).

Texts are encoded as plain text: the tokenizer's own post-processor (e.g. a BOS it would
prepend) is not applied; the data pipeline appends the end-of-document token itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_ext.errors import UserError

METADATA_FILE = "megatron_ext_tokenizer.json"
EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]")


@dataclass
class SpecialTokens:
    """Special token strings; ids are looked up in the vocabulary."""

    bos: str | None = "<s>"
    eos: str | None = "</s>"
    pad: str | None = "<pad>"
    unk: str | None = "<unk>"


class HFTokenizer:
    """A Hugging Face `tokenizers` model loaded from `tokenizer.json`."""

    kind = "huggingface"

    def __init__(self, path: str, eod: str | int | None = None):
        from tokenizers import Tokenizer

        self.path = path
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # the Rust error names no file
            raise UserError(f"{path}: not a readable Hugging Face tokenizer.json ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod_id = _resolve_eod(eod, self._tok.token_to_id, path)
        self._encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._encode(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class SentencePieceTokenizer:
    """A SentencePiece model loaded from a `.model` file."""

    kind = "sentencepiece"

    def __init__(self, path: str, eod: str | int | None = None):
        import sentencepiece as spm

        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except Exception as exc:
            raise UserError(f"{path}: not a readable SentencePiece model ({exc})") from None
        self.vocab_size = self._sp.get_piece_size()

        def lookup(token: str) -> int | None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

        self._lookup = lookup
        if eod is None and self._sp.eos_id() >= 0:
            eod = int(self._sp.eos_id())
        self.eod_id = _resolve_eod(eod, lookup, path)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        return self._lookup(token)


Tokenizer = HFTokenizer | SentencePieceTokenizer


def _resolve_eod(eod, lookup, path: str) -> int | None:
    """An explicit id, an explicit token string, or the first known end-of-text token present."""
    if isinstance(eod, int):
        return eod
    if isinstance(eod, str):
        if eod.isdigit():
            return int(eod)
        found = lookup(eod)
        if found is None:
            raise UserError(f"{path}: end-of-document token {eod!r} is not in the vocabulary")
        return found
    for token in EOD_CANDIDATES:
        found = lookup(token)
        if found is not None:
            return found
    return None


def load_tokenizer(path: str | os.PathLike, eod: str | int | None = None) -> Tokenizer:
    """Load a tokenizer from a file or directory (see module docstring)."""
    p = Path(path)
    if not p.exists():
        raise UserError(
            f"{p}: tokenizer not found (give a tokenizer.json, a .model, or a directory)"
        )
    if p.is_dir():
        meta_path = p / METADATA_FILE
        if meta_path.is_file() and eod is None:
            try:
                eod = json.loads(meta_path.read_text()).get("eos")
            except json.JSONDecodeError as exc:
                raise UserError(f"{meta_path}: invalid JSON ({exc})") from None
        if (p / "tokenizer.json").is_file():
            return HFTokenizer(str(p / "tokenizer.json"), eod)
        models = sorted(p.glob("*.model"))
        if models:
            return SentencePieceTokenizer(str(models[0]), eod)
        raise UserError(f"{p}: directory has neither tokenizer.json nor a SentencePiece .model")
    if p.suffix == ".model":
        return SentencePieceTokenizer(str(p), eod)
    return HFTokenizer(str(p), eod)
