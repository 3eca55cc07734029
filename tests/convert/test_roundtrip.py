"""HF -> our shards (tp, pp in {1, 2}) -> HF through the one driver: bit-identical, logits
equal transformers', the trainer layout and the CLI wired through layout.py."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_ext.cli import main as cli_main
from megatron_ext.convert import driver, layout
from megatron_ext.convert.safetensors_io import HFCheckpoint, TensorSpec
from megatron_ext.models import ModelConfig, build_model, get_family
from megatron_ext.parallel.tensor_parallel import gather_vocab_parallel_logits
from tests.models.hf_cases import BATCH, CASES, SEQ, hf_model

NAMES = ["bloom-odd", "llama-gqa"]


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory):
    config = ModelConfig(**CASES[request.param])
    model = hf_model(config, seed=3)
    hf_dir = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(hf_dir, max_shard_size="300KB")  # several shards + index
    ids = torch.randint(
        0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        logits = model(ids).logits
    return {"config": config, "hf_dir": hf_dir, "ids": ids, "logits": logits, "model": model}


def read_all(directory) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint(directory)
    return {name: ckpt.get(name) for name in ckpt.keys()}


def assert_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_round_trip_is_bit_identical(case, tp, pp, tmp_path):
    config, family = case["config"], get_family(case["config"].family)
    stages = driver.hf_to_stage_state_dicts(case["hf_dir"], tp, pp)
    assert sorted(stages) == [(r, s) for r in range(tp) for s in range(pp)]
    per_rank: dict[int, dict] = {}
    for (rank, _), state in stages.items():
        assert not set(state) & set(per_rank.get(rank, {})), "a parameter in two stages"
        per_rank.setdefault(rank, {}).update(state)
    if config.vocab_size % (128 * tp):  # padding rows exist in our shards, and are zero
        assert per_rank[0]["embedding.word_embeddings.weight"].shape[0] * tp > config.vocab_size
    get = lambda r, n: per_rank[r][n]  # noqa: E731
    spec = lambda r, n: TensorSpec(n, get(r, n).dtype, tuple(get(r, n).shape))  # noqa: E731
    specs = driver.hf_specs_from_shards(spec, family, config, tp)
    out = driver.write_hf(
        tmp_path / "out", driver.iter_to_hf(get, family, config, tp), specs, family, config,
        max_shard_size=200_000,
    )  # fmt: skip
    assert (out / "model.safetensors.index.json").is_file()
    assert_identical(read_all(out), read_all(case["hf_dir"]))


def test_logits_of_our_model_from_converted_shards(case):
    config = case["config"]
    (state,) = driver.hf_to_stage_state_dicts(case["hf_dir"], 1, 1).values()
    ours = build_model(config.replace(fused_ops=False))
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        logits = gather_vocab_parallel_logits(ours(case["ids"]), None, config.vocab_size)
    torch.testing.assert_close(logits, case["logits"], atol=1e-4, rtol=0)


def test_trainer_layout_and_cli_round_trip(case, tmp_path):
    """from-hf (tp=2) writes per-layer files; to-hf reads them lazily; transformers loads it."""
    from transformers import AutoModelForCausalLM

    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    root, out = tmp_path / "ckpt", tmp_path / "out"
    assert cli_main(["convert", "from-hf", str(case["hf_dir"]), str(root), "--tp", "2"]) == 0
    tag = layout.resolve_tag_dir(root)
    config = case["config"]
    assert layout.layer_file(tag, config.num_layers + 1, 1).is_file()
    args = ["convert", "to-hf", str(root), str(out), "--tokenizer", str(tok), "--eos-id", "2"]
    assert cli_main([*args, "--max-shard-size", "300KB"]) == 0
    assert_identical(read_all(out), read_all(case["hf_dir"]))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert (out / "tokenizer.json").is_file() and "config" in (out / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(case["ids"]).logits, case["logits"], atol=1e-4, rtol=0)


def test_cli_from_hf_and_reshard_at_tp2_pp2(case, tmp_path):
    """from-hf straight to (2, 2), then reshard (2, 2) -> (1, 1) -> (2, 2): every export equals
    the source model bit for bit (TP split and merge and the stage cut in one checkpoint)."""
    source = read_all(case["hf_dir"])
    a, b, c = tmp_path / "a_22", tmp_path / "b_11", tmp_path / "c_22"
    hops = [
        (["from-hf", "--hf-dir", str(case["hf_dir"])], a, 2, 2),
        (["reshard", "--checkpoint", str(a)], b, 1, 1),
        (["reshard", "--checkpoint", str(b)], c, 2, 2),
    ]
    for argv, root, tp, pp in hops:
        assert (
            cli_main(["convert", *argv, "--output", str(root), "--tp", str(tp), "--pp", str(pp)])
            == 0
        )
        tag = layout.resolve_tag_dir(root)
        assert layout.layer_file(tag, 0, tp - 1).is_file()
        assert not layout.layer_file(tag, 0, tp).exists()
        out = tmp_path / f"hf_{root.name}"
        assert cli_main(["convert", "to-hf", "--checkpoint", str(root), "--output", str(out)]) == 0
        assert_identical(read_all(out), source)
