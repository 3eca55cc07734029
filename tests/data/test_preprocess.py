"""`megatron-ext preprocess`: input kinds, tokenizer kinds, worker invariance, bad input."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.data.preprocess import PreprocessConfig, preprocess
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.errors import UserError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fi_texts(fi_sample_path) -> list[str]:
    with gzip.open(fi_sample_path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f][:60]


def write_jsonl(path: Path, texts, key="text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
    return path


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_ext", "preprocess", "--no-progress", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def run(tmp_path, inputs, tokenizer, name="out", **kw) -> IndexedDataset:
    prefix = tmp_path / name
    preprocess(
        PreprocessConfig(
            inputs=[str(i) for i in inputs],
            output_prefix=str(prefix),
            tokenizer=str(tokenizer),
            progress=False,
            **kw,
        )
    )
    return IndexedDataset(prefix)


def assert_docs(ds: IndexedDataset, tok, texts, eod=True):
    assert ds.num_documents == len(texts)
    for i, text in enumerate(texts):
        expected = tok.encode(text) + ([tok.eod_id] if eod else [])
        np.testing.assert_array_equal(ds.document(i), expected)


@pytest.mark.parametrize("kind", ["json", "dir", "model"])
def test_each_tokenizer_kind(tmp_path, fi_texts, bpe_tokenizer_dir, unigram_tokenizer_dir, kind):
    tok_path = {
        "json": bpe_tokenizer_dir / "tokenizer.json",
        "dir": bpe_tokenizer_dir,
        "model": unigram_tokenizer_dir / "tokenizer.model",
    }[kind]
    src = write_jsonl(tmp_path / "in.jsonl", fi_texts)
    ds = run(tmp_path, [src], tok_path, append_eod=True)
    tok = load_tokenizer(tok_path)
    assert tok.eod_id == 2  # FinGPT's eos id, as train-tokenizer lays out special tokens
    assert_docs(ds, tok, fi_texts)
    assert ds.dtype == np.uint16
    assert tok.decode(ds.document(0)[:-1]).strip() == fi_texts[0].strip()


def test_each_input_kind_gives_the_same_documents(tmp_path, fi_texts, bpe_tokenizer_dir):
    zstd = pytest.importorskip("zstandard")
    texts = fi_texts[:12]
    tok = load_tokenizer(bpe_tokenizer_dir)
    plain = write_jsonl(tmp_path / "a.jsonl", texts)
    body = plain.read_bytes()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(body))
    for src in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        ds = run(tmp_path, [tmp_path / src], bpe_tokenizer_dir, name=src, append_eod=True)
        assert_docs(ds, tok, texts)

    # plain text: one document per file, or per blank-line block
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, t in enumerate(texts[:3]):
        (txt_dir / f"doc{i}.txt").write_text(t, encoding="utf-8")
    ds = run(tmp_path, [txt_dir], bpe_tokenizer_dir, name="txt_files", append_eod=True)
    assert_docs(ds, tok, [t.strip("\r\n") for t in texts[:3]])
    blocks = ["Ensimmäinen kappale.\nToinen rivi.", "Toinen kappale.", "Kolmas kappale on tässä."]
    (tmp_path / "blocks.txt").write_text("\n\n".join(blocks) + "\n\n\n", encoding="utf-8")
    ds = run(
        tmp_path,
        [tmp_path / "blocks.txt"],
        bpe_tokenizer_dir,
        name="blocks",
        append_eod=True,
        txt_mode="blank-line",
        chunk_bytes=16,
    )
    assert_docs(ds, tok, blocks)

    # directories and globs expand sorted; several files keep the given order
    ds = run(
        tmp_path,
        [str(tmp_path / "*.jsonl"), tmp_path / "b.jsonl.gz"],
        bpe_tokenizer_dir,
        name="glob",
        append_eod=True,
    )
    assert_docs(ds, tok, texts + texts)


def test_output_independent_of_worker_count(tmp_path, fi_texts, bpe_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", fi_texts)
    for workers in (1, 2, 3):
        run(
            tmp_path,
            [src],
            bpe_tokenizer_dir,
            name=f"w{workers}",
            workers=workers,
            append_eod=True,
            chunk_bytes=20_000,
        )
    for workers in (2, 3):
        for ext in (".bin", ".idx"):
            assert filecmp.cmp(tmp_path / f"w1{ext}", tmp_path / f"w{workers}{ext}", shallow=False)


BAD_RECORDS = {
    "malformed JSON": (b'{"text": "rikki\n', "malformed JSON"),
    "missing key": (b'{"body": "ei tekstia"}\n', "missing key 'text'"),
    "non-string value": (b'{"text": 42}\n', "value of 'text' is int, not a string"),
    "invalid UTF-8": (b'{"text": "\xff\xfe"}\n', "invalid UTF-8"),
    "empty document": (b'{"text": "   "}\n', "empty document"),
}


def bad_file(tmp_path: Path, case: str) -> Path:
    good = [
        json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n"
        for t in ("Hyvää huomenta.", "Kiitos paljon.", "Näkemiin.")
    ]
    path = tmp_path / f"bad_{case.replace(' ', '_')}.jsonl"
    path.write_bytes(good[0] + good[1] + BAD_RECORDS[case][0] + good[2])
    return path


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_skipped_and_reported(tmp_path, bpe_tokenizer_dir, case):
    src = bad_file(tmp_path, case)
    proc = cli(
        "--input",
        src,
        "--output-prefix",
        tmp_path / "out",
        "--tokenizer",
        bpe_tokenizer_dir,
        "--append-eod",
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{src}:3: {BAD_RECORDS[case][1]}" in proc.stdout
    assert f"skipped records: 1 ({case}: 1)" in proc.stdout
    ds = IndexedDataset(tmp_path / "out")
    tok = load_tokenizer(bpe_tokenizer_dir)
    assert_docs(ds, tok, ["Hyvää huomenta.", "Kiitos paljon.", "Näkemiin."])


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_strict_fails_without_output(tmp_path, bpe_tokenizer_dir, case):
    src = bad_file(tmp_path, case)
    # an older good dataset under the same prefix must survive a failed run untouched
    old = run(
        tmp_path, [write_jsonl(tmp_path / "old.jsonl", ["vanha"])], bpe_tokenizer_dir, name="out"
    )
    before = (tmp_path / "out.bin").read_bytes()
    del old
    proc = cli(
        "--input",
        src,
        "--output-prefix",
        tmp_path / "out",
        "--tokenizer",
        bpe_tokenizer_dir,
        "--append-eod",
        "--strict",
        "--workers",
        "2",
        "--overwrite",
    )
    assert proc.returncode == 2
    assert f"{src}:3: {BAD_RECORDS[case][1]}" in proc.stderr
    assert (tmp_path / "out.bin").read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or "shard" in p.name]
    assert leftovers == []


def test_failures_before_any_work(tmp_path, bpe_tokenizer_dir):
    good = write_jsonl(tmp_path / "good.jsonl", ["Hei maailma"])
    (tmp_path / "fake.jsonl.gz").write_bytes(b"this is not gzip data")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--input", tmp_path / "missing.jsonl"], "missing.jsonl: no such file"),
        (["--input", tmp_path / "fake.jsonl.gz"], "fake.jsonl.gz: cannot read input"),
        (["--input", str(tmp_path / "nothing*.jsonl")], "matches no file"),
        (
            ["--input", good, "--output-prefix", tmp_path / "a_file" / "sub" / "out"],
            "output directory cannot be written",
        ),
        (["--input", good, "--tokenizer", tmp_path / "no_tokenizer"], "tokenizer not found"),
    ]
    for extra, message in cases:
        args = {"--output-prefix": tmp_path / "out", "--tokenizer": bpe_tokenizer_dir}
        flat = list(extra)
        for k, v in args.items():
            if k not in flat:
                flat += [k, v]
        proc = cli(*flat)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, (message, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not list(tmp_path.glob("out*"))


def test_no_usable_documents_is_an_error(tmp_path, bpe_tokenizer_dir):
    src = tmp_path / "empty.jsonl"
    src.write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="no usable documents"):
        run(tmp_path, [src], bpe_tokenizer_dir)
    assert not list(tmp_path.glob("out*"))


def test_megatron_lm_wrapper_names_and_bytes(tmp_path, fi_texts, bpe_tokenizer_dir):
    src = write_jsonl(tmp_path / "in.jsonl", fi_texts[:10])
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(src),
            "--output-prefix",
            str(tmp_path / "mlm"),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            str(bpe_tokenizer_dir),
            "--json-keys",
            "text",
            "--append-eod",
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    run(tmp_path, [src], bpe_tokenizer_dir, name="ours", append_eod=True)
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(
            tmp_path / f"mlm_text_document{ext}", tmp_path / f"ours{ext}", shallow=False
        )


def test_large_vocabulary_uses_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(70000)}
    vocab.update({"a": 70000, "b": 70001, "</s>": 70002})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "in.jsonl", ["a b t5 t69999"])
    ds = run(tmp_path, [src], tmp_path / "tokenizer.json", append_eod=True)
    assert ds.dtype == np.int32
    np.testing.assert_array_equal(ds.document(0), [70000, 70001, 5, 69999, 70002])
    assert os.path.getsize(tmp_path / "out.bin") == 5 * 4
