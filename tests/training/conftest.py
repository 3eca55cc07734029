"""A real Finnish dataset (the bundled sample, BPE vocab 1000 = the tiny presets' vocab)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def fi_dataset(tmp_path_factory, fi_sample_path):
    """Prefix of the bundled sample tokenized with a 1000-token BPE (201 docs, ~177k tokens)."""
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess
    from megatron_ext.data.tokenizer_training import train_tokenizer

    root = tmp_path_factory.mktemp("fi_dataset")
    tok = train_tokenizer([fi_sample_path], 1000, root / "tokenizer", "bpe", show_progress=False)
    prefix = root / "fi"
    preprocess(
        PreprocessConfig(
            inputs=[str(fi_sample_path)],
            output_prefix=str(prefix),
            tokenizer=str(tok),
            append_eod=True,
            progress=False,
        )
    )
    return str(prefix)
