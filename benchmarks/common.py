"""What several benchmark scripts share: the tokenised Finnish sample and appending a result."""

from __future__ import annotations

import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def finnish_dataset(work: Path, vocab_size: int = 1000) -> str:
    """The bundled Finnish sample tokenised with a VOCAB_SIZE-token BPE under WORK; the prefix."""
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess
    from megatron_ext.data.tokenizer_training import train_tokenizer
    from megatron_ext.demo.gimp_corpus import sample_corpus_path

    sample = sample_corpus_path()
    tok = train_tokenizer([sample], vocab_size, work / "tokenizer", "bpe", show_progress=False)
    prefix = work / "fi"
    preprocess(PreprocessConfig(inputs=[str(sample)], output_prefix=str(prefix),
                                tokenizer=str(tok), append_eod=True, progress=False))  # fmt: skip
    return str(prefix)


def append_record(path: str, script: str, argv: list[str], text: str) -> None:
    """Append TEXT to the markdown file PATH under today's date and the command that made it."""
    with open(path, "a") as f:
        f.write(f"\n{time.strftime('%Y-%m-%d')}: `python benchmarks/{script} {' '.join(argv)}`"
                f"\n\n{text}\n")  # fmt: skip


def finish(lines: list[str], script: str, record: str | None, argv: list[str] | None) -> None:
    """Print the result LINES and, with --record, append them under the command that made them."""
    import sys

    text = "\n".join(lines)
    print(text)
    if record:
        append_record(record, script, sys.argv[1:] if argv is None else argv, text)


def best(fn, repeats: int) -> float:
    """The fastest wall time of REPEATS calls of FN."""
    import time

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
