#!/usr/bin/env python3
"""Megatron-LM's `tools/preprocess_data.py` flags, on top of `megatron-ext preprocess`.

For users moving over: the same flags and the same output names
(`{output_prefix}_{json_key}_document.bin/.idx`, one dataset per JSON key).
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/fi \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tok_dir --json-keys text \
        --workers 2 --append-eod
Tokenizer types: HuggingFaceTokenizer (a directory or tokenizer.json), SentencePieceTokenizer /
GPTSentencePieceTokenizer (a .model), GPT2BPETokenizer (--vocab-file + --merge-file).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from megatron_ext.data.preprocess import PreprocessConfig, preprocess
from megatron_ext.errors import UserError

SUPPORTED = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "GPT2BPETokenizer",
)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, nargs="+")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--tokenizer-type", required=True, choices=SUPPORTED)
    p.add_argument("--tokenizer-model", help="HF tokenizer dir/json or SentencePiece .model")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--split-sentences", action="store_true")
    p.add_argument(
        "--partitions", type=int, default=1, help="accepted; work is chunked automatically"
    )
    p.add_argument(
        "--log-interval", type=int, default=1000, help="accepted; a progress bar is shown"
    )
    return p.parse_args(argv)


def gpt2_tokenizer_json(vocab: str, merges: str, out_dir: str) -> str:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(vocab, merges)
    path = str(Path(out_dir) / "tokenizer.json")
    tok.save(path)
    return path


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.split_sentences:
            raise UserError("--split-sentences is not supported: documents are kept whole")
        with tempfile.TemporaryDirectory() as tmp:
            if args.tokenizer_type == "GPT2BPETokenizer":
                if not (args.vocab_file and args.merge_file):
                    raise UserError("GPT2BPETokenizer needs --vocab-file and --merge-file")
                tokenizer = gpt2_tokenizer_json(args.vocab_file, args.merge_file, tmp)
            elif not args.tokenizer_model:
                raise UserError(f"{args.tokenizer_type} needs --tokenizer-model")
            else:
                tokenizer = args.tokenizer_model
            for key in args.json_keys:
                prefix = f"{args.output_prefix}_{key}_document"
                summary = preprocess(
                    PreprocessConfig(
                        inputs=args.input,
                        output_prefix=prefix,
                        tokenizer=tokenizer,
                        json_key=key,
                        workers=args.workers,
                        append_eod=args.append_eod,
                        overwrite=True,  # as Megatron-LM's tool: the output is replaced
                    )
                )
                if summary is not None:
                    print(f"{prefix}:\n{summary.format()}")
    except UserError as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
