"""Hostile and malformed input to the conversion commands (issue 15, section 4).

- `convert from-hf`: a config.json that disagrees with the tensors, an index pointing outside
  the model directory, bad JSON, missing tensors, safetensors headers that lie, broken .bin
  files: exit 2 with one line naming the file, and no output directory left behind.
- `convert to-hf`: a config.yaml that disagrees with the shards is refused the same way.
- `eval --checkpoint`: the cached conversion follows the checkpoint's content, not its tag.
- `to-hf --tokenizer` with a bare tokenizer.json: the export has bos/eos for transformers.

Tiny BLOOM/Llama models (2 layers, hidden 64), converted in-process: a few seconds in all.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from megatron_ext.checkpoint_format import write_manifest
from megatron_ext.cli import main as cli_main
from megatron_ext.convert import layout
from megatron_ext.convert.hf_tokenizer import special_token_ids, tokenizer_roles
from megatron_ext.convert.safetensors_io import HFCheckpoint
from megatron_ext.eval.hf_cache import hf_cache_for
from megatron_ext.models import ModelConfig, get_preset
from tests.models.hf_cases import CASES, hf_model

EMB = "transformer.word_embeddings.weight"
VOCAB = 2000  # the session's bpe_tokenizer_dir


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> a saved HF model: bloom (one file), bloom seed 1, sharded bloom, llama (GQA)."""
    root = tmp_path_factory.mktemp("hf")
    bloom = get_preset("tiny").replace(vocab_size=VOCAB, seq_length=64)
    llama = ModelConfig(**CASES["llama-gqa"])
    out = {}
    for name, config, seed, shard in [
        ("bloom", bloom, 0, "5GB"),
        ("bloom-other", bloom, 1, "5GB"),
        ("bloom-sharded", bloom, 0, "100KB"),
        ("llama", llama, 0, "5GB"),
    ]:
        hf_model(config, seed).save_pretrained(root / name, max_shard_size=shard)
        out[name] = root / name
    assert (out["bloom-sharded"] / "model.safetensors.index.json").is_file()
    return out


def copy_of(hf_dirs, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_dirs[name], tmp_path / name))


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def refused(capsys, argv: list[str], output: Path, *fragments: str) -> str:
    """Run the CLI in-process: exit 2, one error line holding every fragment, no output."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("megatron-ext convert: error:")]
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in err
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.partial-*"))
    return line


def from_hf(hf_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "from-hf", "--hf-dir", str(hf_dir), "--output", str(out), *extra]


# ------------------------------------------------------------ 1. config.json vs the tensors


def test_from_hf_refuses_a_config_json_wider_than_its_tensors(hf_dirs, tmp_path, capsys):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    edit_json(hf / "config.json", hidden_size=128)
    out = tmp_path / "out"
    refused(
        capsys, from_hf(hf, out), out,
        f"{hf / 'model.safetensors'}: tensor {EMB}", "[2000, 64]", "[2000, 128]",
        str(hf / "config.json"),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "changes", "fragments"),
    [
        ("bloom-sharded", {"vocab_size": 1999}, ["[2000, 64]", "[1999, 64]", "-of-"]),
        ("bloom", {"n_layer": 3}, ["model.safetensors: no tensor transformer.h.2."]),
        ("bloom", {"n_layer": 1}, ["transformer.h.1.", "past the 1 layers"]),
        ("llama", {"num_key_value_heads": 4}, ["k_proj.weight has shape [16, 64]", "[32, 64]"]),
        ("llama", {"intermediate_size": 128}, ["down_proj.weight", "[64, 160]", "[64, 128]"]),
    ],
)
def test_from_hf_refuses_config_json_that_disagrees(
    hf_dirs, tmp_path, capsys, name, changes, fragments
):
    hf = copy_of(hf_dirs, name, tmp_path)
    edit_json(hf / "config.json", **changes)
    out = tmp_path / "ckpt"
    refused(capsys, from_hf(hf, out, "--tp", "2"), out, *fragments)


def test_from_hf_checks_bin_files_too(hf_dirs, tmp_path, capsys):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    edit_json(hf / "config.json", hidden_size=128)
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, f"{hf / 'pytorch_model.bin'}: tensor {EMB}")


# ------------------------------------------------------------ 2. config.yaml vs the shards


@pytest.mark.parametrize(
    ("name", "field", "value", "fragments"),
    [
        ("bloom", "hidden_size", 32, ["layer_00-model_00-model_states.pt", "word_embeddings"]),
        ("llama", "num_kv_heads", 4, ["layer_01-model_00-model_states.pt", "linear_qkv.weight"]),
    ],
)
def test_to_hf_refuses_config_yaml_that_disagrees(
    hf_dirs, tmp_path, capsys, name, field, value, fragments
):
    ckpt = tmp_path / "ckpt"
    assert cli_main(from_hf(hf_dirs[name], ckpt, "--tp", "2")) == 0
    tag = layout.resolve_tag_dir(ckpt)
    run = yaml.safe_load((tag / "config.yaml").read_text())
    run["model"][field] = value
    (tag / "config.yaml").write_text(yaml.safe_dump(run))
    write_manifest(tag)  # edited and re-listed: only the shapes can tell
    out = tmp_path / "hf_out"
    argv = ["convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(out)]
    refused(capsys, argv, out, *fragments, "has shape", str(tag / "config.yaml"))


def test_a_consistent_checkpoint_still_converts_both_ways(hf_dirs, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(from_hf(hf_dirs["llama"], ckpt, "--tp", "2", "--pp", "2")) == 0
    assert cli_main(["convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    a, b = HFCheckpoint(hf_dirs["llama"]), HFCheckpoint(out)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())


# ------------------------------------------------------------ 3. index entries stay inside


def _index_entry(hf: Path, tmp_path: Path, how: str) -> str:
    """Move the first shard outside `hf` and return the index entry that reaches it."""
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    first = index["weight_map"][EMB]
    outside = tmp_path / "x.safetensors"
    shutil.move(hf / first, outside)
    if how == "symlink":
        (hf / first).symlink_to(outside)
        return first
    return "../x.safetensors" if how == "dotdot" else str(outside)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_outside_the_model_dir_are_refused(hf_dirs, tmp_path, capsys, how):
    hf = copy_of(hf_dirs, "bloom-sharded", tmp_path)
    index = hf / "model.safetensors.index.json"
    first = json.loads(index.read_text())["weight_map"][EMB]
    entry = _index_entry(hf, tmp_path, how)
    text = index.read_text().replace(f'"{first}"', json.dumps(entry))
    index.write_text(text)
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, f"{index}: entry {entry!r}", "outside")


def test_a_single_weights_file_linked_from_outside_is_refused(hf_dirs, tmp_path, capsys):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    shutil.move(hf / "model.safetensors", tmp_path / "elsewhere.safetensors")
    (hf / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, "model.safetensors", "outside")


def test_a_hub_cache_snapshot_with_links_into_blobs_still_converts(hf_dirs, tmp_path):
    """transformers' own cache layout: snapshots/<rev>/* are links to ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in hf_dirs["bloom-sharded"].iterdir():
        shutil.copy(f, repo / "blobs" / f"blob-{f.name}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob-{f.name}")
    assert cli_main(from_hf(snapshot, tmp_path / "ckpt")) == 0


# ------------------------------------------------------------ 4. malformed files


def test_missing_tensor_names_the_weights_file(hf_dirs, tmp_path, capsys):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    tensors = load_file(hf / "model.safetensors")
    del tensors["transformer.h.1.mlp.dense_4h_to_h.bias"]
    save_file(tensors, hf / "model.safetensors")
    out = tmp_path / "out"
    refused(
        capsys, from_hf(hf, out), out,
        f"{hf / 'model.safetensors'}: no tensor transformer.h.1.mlp.dense_4h_to_h.bias",
    )  # fmt: skip


def test_index_naming_a_tensor_its_shard_lacks(hf_dirs, tmp_path, capsys):
    hf = copy_of(hf_dirs, "bloom-sharded", tmp_path)
    index = hf / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    data["weight_map"][EMB] = next(s for s in shards if s != data["weight_map"][EMB])
    index.write_text(json.dumps(data))
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, f"{index}: lists tensor {EMB}", "no such tensor")


@pytest.mark.parametrize(
    ("file", "text", "fragment"),
    [
        ("config.json", '{"architectures": ["BloomForCausalLM"], ', "not readable JSON"),
        ("config.json", "[1, 2]", "not a JSON object"),
        ("config.json", '{"architectures": ["BloomForCausalLM"]}', "missing or invalid field"),
        ("config.json", None, "hidden_size is '64', not an integer"),
        ("config.json", '{"architectures": "BloomForCausalLM"}', "has no key map"),
        ("model.safetensors.index.json", '{"weight_map": {', "not a readable JSON index"),
        ("model.safetensors.index.json", '{"metadata": {}}', 'no "weight_map" object'),
        ("model.safetensors.index.json", '{"weight_map": {"a": "nope.st"}}', "is missing"),
    ],
)
def test_bad_json_names_the_file(hf_dirs, tmp_path, capsys, file, text, fragment):
    hf = copy_of(hf_dirs, "bloom-sharded", tmp_path)
    if text is None:
        edit_json(hf / file, hidden_size="64")
    else:
        (hf / file).write_text(text)
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, str(hf / file), fragment)


def _rewrite_header(path: Path, tweak) -> None:
    """Re-write a safetensors file with its header changed by `tweak(header)` (data kept)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    tweak(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _last(header: dict) -> dict:
    return max(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
    )


def _first(header: dict) -> dict:
    return min(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
    )


def _set(entry: dict, **kw) -> None:
    entry.update(kw)


def _shift(entry: dict, by: int) -> None:
    entry["data_offsets"] = [x + by for x in entry["data_offsets"]]


LIES = {
    "offsets past the end": (lambda h: _last(h)["data_offsets"].__setitem__(1, 10**9), "outside"),
    "dtype vs byte range": (lambda h: _set(h[EMB], dtype="F16"), "needs 256000 bytes"),
    "shape vs byte range": (lambda h: _set(h[EMB], shape=[2000, 65]), "needs 520000 bytes"),
    "unknown dtype": (lambda h: _set(h[EMB], dtype="F8_E4M3"), "dtype 'F8_E4M3' is not one of"),
    "negative size": (lambda h: _set(h[EMB], shape=[-2000, 64]), "is not a list of sizes"),
    "overlapping": (lambda h: _shift(_first(h), 4), "starts at byte 4 of the data, expected 0"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_safetensors_header_that_lies_is_refused(hf_dirs, tmp_path, capsys, lie):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    tweak, fragment = LIES[lie]
    _rewrite_header(hf / "model.safetensors", tweak)
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, f"{hf / 'model.safetensors'}: not a valid", fragment)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "exceeds the file"),
        (lambda raw: raw[: len(raw) - 100], "data_offsets"),
        (lambda raw: raw[:5], "shorter than the 8-byte header length"),
        (lambda raw: raw[:8] + b"\xff" * (len(raw) - 8), "the header is not JSON"),
        (lambda raw: raw + b"\0" * 64, "tensors cover"),
    ],
    ids=["header-length", "truncated", "tiny", "garbage", "trailing-bytes"],
)
def test_a_damaged_safetensors_file_is_refused(hf_dirs, tmp_path, capsys, damage, fragment):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    path = hf / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, f"{path}: not a valid safetensors file", fragment)


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda path: path.write_bytes(path.read_bytes()[:-300]), "corrupt or truncated"),
        (lambda path: torch.save([torch.zeros(2)], path), "not a state dict"),
        (lambda path: path.write_bytes(b"not a pickle at all"), "not a torch.save file"),
    ],
    ids=["truncated", "a-list", "garbage"],
)
def test_a_damaged_bin_file_is_refused(hf_dirs, tmp_path, capsys, damage, fragment):
    hf = copy_of(hf_dirs, "bloom", tmp_path)
    path = hf / "pytorch_model.bin"
    torch.save(load_file(hf / "model.safetensors"), path)
    (hf / "model.safetensors").unlink()
    damage(path)
    out = tmp_path / "out"
    refused(capsys, from_hf(hf, out), out, str(path), fragment)


# ------------------------------------------------------------ 5. the eval cache follows content


def _format_1_manifest(tag: Path, mtime_s: int) -> None:
    """A manifest without checksums (names and sizes), and every file's mtime set."""
    files = {p.name: p.stat().st_size for p in tag.iterdir() if p.name != "manifest.json"}
    (tag / "manifest.json").write_text(json.dumps({"files": files}))
    for p in tag.iterdir():
        os.utime(p, ns=(mtime_s * 10**9, mtime_s * 10**9))


@pytest.mark.parametrize("checksums", [True, False], ids=["crc32-manifest", "sizes-manifest"])
def test_eval_cache_is_converted_again_when_the_checkpoint_changes(
    hf_dirs, tmp_path, bpe_tokenizer_dir, checksums
):
    root, other = tmp_path / "ckpt", tmp_path / "other"
    assert cli_main(from_hf(hf_dirs["bloom"], root)) == 0
    assert cli_main(from_hf(hf_dirs["bloom-other"], other)) == 0
    tag, replacement = root / "iter_0000000", other / "iter_0000000"
    if not checksums:  # same names and sizes: only the mtimes tell them apart
        _format_1_manifest(tag, 1_700_000_000)
        _format_1_manifest(replacement, 1_800_000_000)
    want = {name: HFCheckpoint(hf_dirs[name]).get(EMB) for name in ("bloom", "bloom-other")}
    assert not torch.equal(want["bloom"], want["bloom-other"])

    cached = hf_cache_for(root, None, str(bpe_tokenizer_dir))
    assert cached == root / "hf-cache" / "iter_0000000"
    assert torch.equal(HFCheckpoint(cached).get(EMB), want["bloom"])
    stamp = (cached / "config.json").stat().st_mtime_ns
    assert hf_cache_for(root, None, None) == cached  # unchanged: reused as it is
    assert (cached / "config.json").stat().st_mtime_ns == stamp

    shutil.rmtree(tag)  # the same tag saved again, with other weights
    shutil.copytree(replacement, tag)
    assert hf_cache_for(root, None, None) == cached  # the previous tokenizer is reused
    assert torch.equal(HFCheckpoint(cached).get(EMB), want["bloom-other"])
    assert (cached / "tokenizer.json").is_file()
    assert sorted(p.name for p in cached.parent.iterdir()) == ["iter_0000000"]


# ------------------------------------------------------------ 6. a bare tokenizer.json


def test_export_with_a_bare_tokenizer_json_has_special_tokens(hf_dirs, tmp_path, bpe_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(Path(bpe_tokenizer_dir) / "tokenizer.json", tok / "tokenizer.json")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(from_hf(hf_dirs["bloom"], ckpt)) == 0
    argv = ["convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(out)]
    assert cli_main([*argv, "--tokenizer", str(tok)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.unk_token, tokenizer.pad_token) == ("<unk>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("Hyvää huomenta, Suomi!", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], VOCAB)


def test_special_tokens_of_a_bare_tokenizer_json_by_their_usual_names(tmp_path):
    added = [
        {"id": i, "content": t, "special": True} for i, t in enumerate(["<|endoftext|>", "[PAD]"])
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    assert tokenizer_roles(tmp_path) == {"eos": "<|endoftext|>", "pad": "[PAD]"}
    assert special_token_ids(tmp_path) == {"eos_token_id": 0, "pad_token_id": 1}
    (tmp_path / "megatron_ext_tokenizer.json").write_text(json.dumps({"eos": "[PAD]"}))
    assert tokenizer_roles(tmp_path) == {"eos": "[PAD]"}  # as the training metadata says


def test_a_tokenizer_config_that_is_not_json_is_refused(hf_dirs, tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text("{oops")
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(from_hf(hf_dirs["bloom"], ckpt)) == 0
    argv = ["convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(out)]
    refused(capsys, [*argv, "--tokenizer", str(tok)], out, str(tok / "tokenizer_config.json"))
