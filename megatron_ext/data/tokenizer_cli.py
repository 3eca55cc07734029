"""`megatron-ext train-tokenizer`: the command line of data/tokenizer_training.py."""

from __future__ import annotations

import json
from dataclasses import asdict

from megatron_ext.data.tokenizer_training import (
    DEFAULT_SPECIAL_TOKENS,
    KINDS,
    METADATA_FILE,
    SpecialTokens,
    resolve_roles,
    train_tokenizer,
)


def add_arguments(parser) -> None:
    p = parser
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help=".jsonl/.json/.txt files (optionally .gz) or directories of them",
    )
    p.add_argument("--vocab-size", type=int, required=True, help="total, special tokens included")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--type",
        choices=KINDS,
        default="bpe",
        help="bpe: byte-level BPE (Hugging Face); unigram: SentencePiece",
    )
    p.add_argument("--json-key", default="text", help="text field of JSON lines")
    p.add_argument(
        "--special-tokens",
        nargs="+",
        default=list(DEFAULT_SPECIAL_TOKENS),
        metavar="TOKEN",
        help="special tokens, ids 0..n-1 in this order (default: %(default)s)",
    )
    for role, default in asdict(SpecialTokens()).items():
        p.add_argument(
            f"--{role}",
            default=None,
            metavar="TOKEN",
            help=f"the {role} token, one of --special-tokens, or 'none' "
            f"(default: {default} if among them)",
        )
    p.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="bpe: least count of a merged pair (default: %(default)s)",
    )
    p.add_argument(
        "--max-sentences",
        type=int,
        default=10_000_000,
        help="unigram: lines SentencePiece samples (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    p.add_argument("--no-progress", action="store_true", help="no progress output")


def run(args) -> int:
    roles = resolve_roles(args.special_tokens, args.bos, args.eos, args.pad, args.unk)
    out = train_tokenizer(
        args.input,
        args.vocab_size,
        args.output,
        args.type,
        json_key=args.json_key,
        special_tokens=args.special_tokens,
        roles=roles,
        min_frequency=args.min_frequency,
        max_sentences=args.max_sentences,
        overwrite=args.overwrite,
        show_progress=not args.no_progress,
    )
    meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    print(
        f"wrote {out}: {meta['type']} tokenizer, vocab {meta['vocab_size']}, "
        f"eos {meta['eos']!r} = {meta['eos_id']}"
    )
    return 0
