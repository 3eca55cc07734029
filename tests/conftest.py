"""Shared fixtures. Tiers: unit (default), distributed, slurm, gpu (skipped without a GPU)."""

from __future__ import annotations

import pytest


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="no CUDA/ROCm GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Finnish sample corpus and tokenizers trained on it (once per session; about 2 s together).
SAMPLE_VOCAB_SIZE = 2000


@pytest.fixture(scope="session")
def fi_sample_path():
    """The bundled Finnish corpus, megatron_ext/assets/fi_gimp_sample.jsonl.gz (201 docs)."""
    from megatron_ext.demo.gimp_corpus import sample_corpus_path

    return sample_corpus_path()


def _trained_tokenizer(tmp_path_factory, sample, kind: str):
    from megatron_ext.data.tokenizer_training import train_tokenizer

    out = tmp_path_factory.mktemp(f"{kind}_tokenizer") / "tokenizer"
    return train_tokenizer([sample], SAMPLE_VOCAB_SIZE, out, kind, show_progress=False)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, fi_sample_path):
    """Byte-level BPE (vocab 2000; <unk>=0 <s>=1 </s>=2 <pad>=3) trained on the sample."""
    return _trained_tokenizer(tmp_path_factory, fi_sample_path, "bpe")


@pytest.fixture(scope="session")
def unigram_tokenizer_dir(tmp_path_factory, fi_sample_path):
    """SentencePiece unigram (vocab 2000; <unk>=0 <s>=1 </s>=2 <pad>=3) trained on the sample."""
    return _trained_tokenizer(tmp_path_factory, fi_sample_path, "unigram")


@pytest.fixture(scope="session")
def fi_dataset(tmp_path_factory, fi_sample_path):
    """Training data for the training and Slurm tiers. Prefix of the bundled sample tokenized with a 1000-token BPE (201 docs, ~177k tokens)."""
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
