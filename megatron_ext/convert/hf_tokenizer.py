"""The tokenizer files of a Hugging Face export: copied from `--tokenizer DIR`, and completed so
that `transformers.AutoTokenizer.from_pretrained(export)` knows the special tokens.

A directory written by `megatron-ext train-tokenizer --kind bpe` holds tokenizer.json,
tokenizer_config.json and special_tokens_map.json: they are copied as they are. One holding
only tokenizer.json would load as a tokenizer without bos/eos (lm-eval fails on it), so the
two configs are written here: `PreTrainedTokenizerFast`, and bos/eos/unk/pad chosen among the
tokenizer's special tokens, as its megatron_ext_tokenizer.json names them when there is one,
else by the usual names (ours: `<unk>` `<s>` `</s>` `<pad>`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from megatron_ext.convert.safetensors_io import read_json_object
from megatron_ext.data.tokenizer import EOD_CANDIDATES, METADATA_FILE
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
)  # fmt: skip
ROLE_NAMES = {
    "bos": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"),
    "eos": EOD_CANDIDATES,
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
}


def _read_json(path: Path) -> dict:
    return read_json_object(path, "fix or remove it")


def _token_text(value) -> str | None:
    """A token as tokenizer configs write it: a string, or {"content": ...}."""
    value = value.get("content") if isinstance(value, dict) else value
    return value if isinstance(value, str) and value else None


def _specials(tokenizer: dict) -> list[str]:
    added = tokenizer.get("added_tokens")
    added = added if isinstance(added, list) else []
    return [t["content"] for t in added if isinstance(t, dict) and t.get("special")]


def _ids(tokenizer: dict) -> dict[str, int]:
    """token -> id: the added tokens, over the model's vocabulary when it is a mapping."""
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = dict(vocab) if isinstance(vocab, dict) else {}
    for t in tokenizer.get("added_tokens") or []:
        if isinstance(t, dict) and isinstance(t.get("id"), int):
            ids[t.get("content")] = t["id"]
    return {k: v for k, v in ids.items() if isinstance(k, str) and isinstance(v, int)}


def _inferred_roles(d: Path, tokenizer: dict) -> dict[str, str]:
    """Roles of a bare tokenizer.json's special tokens (megatron_ext_tokenizer.json first)."""
    specials = _specials(tokenizer)
    if (d / METADATA_FILE).is_file():
        meta = _read_json(d / METADATA_FILE)
        named = {role: meta.get(role) for role in ROLE_NAMES}
        return {r: t for r, t in named.items() if isinstance(t, str) and t in specials}
    roles = {}
    for role, names in ROLE_NAMES.items():
        found = [name for name in names if name in specials]
        if found:
            roles[role] = found[0]
    return roles


def tokenizer_roles(tokenizer_dir: str | Path | None) -> dict[str, str]:
    """{"bos"|"eos"|"unk"|"pad": token} of a tokenizer directory: as its tokenizer_config.json
    names them, else inferred from tokenizer.json; {} when it has neither file."""
    if tokenizer_dir is None:
        return {}
    d = Path(tokenizer_dir)
    if (d / "tokenizer_config.json").is_file():
        names = _read_json(d / "tokenizer_config.json")
        named = {role: _token_text(names.get(f"{role}_token")) for role in ROLE_NAMES}
        return {role: token for role, token in named.items() if token is not None}
    if not (d / "tokenizer.json").is_file():
        return {}
    return _inferred_roles(d, _read_json(d / "tokenizer.json"))


def special_token_ids(tokenizer_dir: str | Path | None) -> dict[str, int]:
    """{"bos_token_id": .., "eos_token_id": .., "pad_token_id": ..} of a tokenizer directory,
    the ids from its tokenizer.json; {} (or fewer keys) where it does not say."""
    roles = tokenizer_roles(tokenizer_dir)
    path = Path(tokenizer_dir) / "tokenizer.json" if tokenizer_dir is not None else None
    if not roles or path is None or not path.is_file():
        return {}
    ids = _ids(_read_json(path))
    return {f"{r}_token_id": ids[t] for r, t in roles.items() if r != "unk" and t in ids}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_configs(tokenizer_dir: Path, out: Path, seq_length: int) -> None:
    roles = tokenizer_roles(tokenizer_dir)
    if "eos" not in roles:
        log.warning(
            "%s: no end-of-text token among its special tokens (looked for %s): the export's "
            "tokenizer has no eos, which lm-eval needs",
            tokenizer_dir / "tokenizer.json",
            ", ".join(ROLE_NAMES["eos"]),
        )
    tokens = {f"{role}_token": token for role, token in roles.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "model_max_length": seq_length,
        "clean_up_tokenization_spaces": False,  # else decode() would change the text
    }
    _write_json(out / "tokenizer_config.json", config)
    if not (out / "special_tokens_map.json").is_file():
        _write_json(out / "special_tokens_map.json", tokens)


def write_tokenizer_files(tokenizer_dir: str | Path, out: Path, seq_length: int) -> None:
    """Copy the tokenizer files of `tokenizer_dir` into `out`; a bare tokenizer.json gets a
    tokenizer_config.json and special_tokens_map.json (see the module docstring)."""
    d = Path(tokenizer_dir)
    copied = [f for f in TOKENIZER_FILES if (d / f).is_file()]
    if not copied:
        raise UserError(f"{d}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for name in copied:
        shutil.copy2(d / name, out / name)
    if "tokenizer.json" in copied and "tokenizer_config.json" not in copied:
        _write_configs(d, out, seq_length)
