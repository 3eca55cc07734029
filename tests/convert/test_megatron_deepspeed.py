"""`convert from-megatron-deepspeed`: Megatron-DeepSpeed layer files and DeepSpeed universal
checkpoints, built here in the documented layout from a tiny random BLOOM (TP=2 cut by
Megatron's rules), convert to exactly what `convert from-hf` makes of the same model."""

from __future__ import annotations

import argparse
import enum
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.cli import main as cli_main
from megatron_ext.convert import driver, layout
from megatron_ext.convert.megatron_deepspeed import convert
from megatron_ext.errors import UserError
from megatron_ext.models import ModelConfig, build_model
from megatron_ext.parallel.tensor_parallel import gather_vocab_parallel_logits
from tests.models.hf_cases import hf_model

LAYERS, HIDDEN, HEADS, VOCAB, PADDED = 3, 64, 4, 250, 256  # 250 pads to 256 at tp=2
SRC_TP = 2
COLUMN = ("query_key_value", "dense_h_to_4h")
ROW = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    """A tiny random BloomForCausalLM saved as HF, its state dict and logits."""
    config = ModelConfig(
        family="bloom", num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        vocab_size=VOCAB, seq_length=64,
    )  # fmt: skip
    model = hf_model(config, seed=5)
    hf_dir = tmp_path_factory.mktemp("hf") / "bloom"
    model.save_pretrained(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids).logits
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Megatron pads the vocabulary to 128 * tp rows; its padding rows are trained weights too.
    emb = state["transformer.word_embeddings.weight"]
    padding = torch.randn(PADDED - VOCAB, HIDDEN, generator=torch.Generator().manual_seed(4))
    state["transformer.word_embeddings.weight"] = torch.cat([emb, padding])
    return {"config": config, "hf_dir": hf_dir, "state": state, "ids": ids, "logits": logits}


# --- writing the source layouts (Megatron's rules, independent of our key map) -----------------


def megatron_layers(state: dict) -> dict[int, dict[str, torch.Tensor]]:
    """Full (unsplit) tensors per GPTModelPipe layer index: 1 embedding, 3.. blocks, L+4 norm."""
    t = "transformer."
    layers = {
        1: {
            "word_embeddings.weight": state[t + "word_embeddings.weight"],
            "word_embeddings.norm.weight": state[t + "word_embeddings_layernorm.weight"],
            "word_embeddings.norm.bias": state[t + "word_embeddings_layernorm.bias"],
        },
        LAYERS + 4: {"weight": state[t + "ln_f.weight"], "bias": state[t + "ln_f.bias"]},
    }
    for i in range(LAYERS):
        prefix = f"{t}h.{i}."
        layers[3 + i] = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return layers


def megatron_split(key: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    if key == "word_embeddings.weight" or any(c in key for c in COLUMN):
        return full.chunk(tp, dim=0)[rank].clone()
    if key in ROW:
        return full.chunk(tp, dim=1)[rank].clone()
    return full.clone()  # replicated


class PositionEmbeddingType(enum.Enum):  # stands for megatron.enums.PositionEmbeddingType
    rotary = 1
    absolute = 2
    alibi = 3


@pytest.fixture
def megatron_enums(monkeypatch):
    """Make `megatron.enums` importable while the test pickles args, as Megatron's hold them."""
    module = types.ModuleType("megatron.enums")
    PositionEmbeddingType.__module__ = "megatron.enums"
    module.PositionEmbeddingType = PositionEmbeddingType
    monkeypatch.setitem(sys.modules, "megatron.enums", module)
    return PositionEmbeddingType


def megatron_args(position=PositionEmbeddingType.alibi, **changes) -> argparse.Namespace:
    args = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN,
        num_attention_heads=HEADS, seq_length=64, max_position_embeddings=64,
        padded_vocab_size=PADDED, make_vocab_size_divisible_by=128, layernorm_epsilon=1e-5,
        init_method_std=0.02, tensor_model_parallel_size=SRC_TP, pipeline_model_parallel_size=2,
        embed_layernorm=True, glu_activation=None, position_embedding_type=position,
        apply_residual_connection_post_layernorm=False, bf16=False, params_dtype=torch.float32,
    )  # fmt: skip
    return argparse.Namespace(**{**args, **changes})


def write_mp_rank_files(tag_dir: Path, args: argparse.Namespace) -> None:
    """Engine + client state as Megatron-DeepSpeed saves it (args, numpy rng, no weights)."""
    for mp_rank in range(SRC_TP * 2):
        state = {
            "module": None, "dp_world_size": 1, "mp_world_size": SRC_TP * 2,
            "args": args, "checkpoint_version": 3.0, "iteration": 7, "tokens": 7 * 64,
            "np_rng_state": np.random.RandomState(0).get_state(),
            "torch_rng_state": torch.get_rng_state(),
        }  # fmt: skip
        torch.save(state, tag_dir / f"mp_rank_{mp_rank:02d}_model_states.pt")


def write_megatron(root: Path, state: dict, args: argparse.Namespace | None) -> Path:
    tag_dir = root / "global_step7"
    tag_dir.mkdir(parents=True)
    for index, tensors in megatron_layers(state).items():
        for rank in range(SRC_TP):
            shard = {k: megatron_split(k, v, rank, SRC_TP) for k, v in tensors.items()}
            torch.save(shard, tag_dir / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
    if args is not None:
        write_mp_rank_files(tag_dir, args)
    (root / "latest").write_text("global_step7")
    return tag_dir


def write_universal(root: Path, state: dict, args: argparse.Namespace) -> Path:
    """zero/<PipelineModule param>/fp32.pt as ds_to_universal writes (vocabulary unpadded)."""
    tag_dir = root / "global_step7_universal"
    for index, tensors in megatron_layers(state).items():
        for key, full in tensors.items():
            name = f"tied_modules.embed.{key}" if index == 1 else f"{index}.{key}"
            (tag_dir / "zero" / name).mkdir(parents=True)
            param = full[:VOCAB] if key == "word_embeddings.weight" else full
            cat_dim = 1 if key in ROW else 0
            for moment in ("fp32", "exp_avg", "exp_avg_sq"):
                value = param.float() if moment == "fp32" else torch.zeros_like(param)
                torch.save(
                    {"param": value, "cat_dim": cat_dim}, tag_dir / "zero" / name / f"{moment}.pt"
                )
    write_mp_rank_files(tag_dir, args)
    (root / "latest_universal").write_text(tag_dir.name)
    return tag_dir


# --- comparing checkpoints ------------------------------------------------------------------


def assert_same_checkpoint(a_root: Path, b_root: Path) -> None:
    """Same layer files with bit-identical tensors, same model (but seq_length) and layout."""
    a, b = layout.resolve_tag_dir(a_root), layout.resolve_tag_dir(b_root)
    names = sorted(p.name for p in a.glob("layer_*.pt"))
    assert names and names == sorted(p.name for p in b.glob("layer_*.pt"))
    for name in names:
        x, y = torch.load(a / name, weights_only=True), torch.load(b / name, weights_only=True)
        assert sorted(x) == sorted(y), name
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (name, key)
    ca, cb = layout.read_run_config(a), layout.read_run_config(b)
    assert ca["parallel"] == cb["parallel"]
    # Megatron's args know the training sequence length; a HF BLOOM config does not.
    drop = lambda model: {k: v for k, v in model.items() if k != "seq_length"}  # noqa: E731
    assert drop(ca["model"]) == drop(cb["model"])


def from_hf(bloom, tmp_path: Path, tp: int, pp: int) -> Path:
    out = tmp_path / "from_hf"
    driver.hf_to_pipeline_checkpoint(bloom["hf_dir"], out, tp, pp)
    return out


def leftovers(parent: Path) -> list[str]:
    """Hidden temp dirs of a failed conversion (none may remain)."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")] if parent.exists() else []


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2), (4, 1)])
def test_layer_files_convert_like_hf(bloom, megatron_enums, tmp_path, tp, pp):
    """Model config from the pickled args (enum, numpy rng inside), padding rows dropped."""
    write_megatron(tmp_path / "mds", bloom["state"], megatron_args())
    out = tmp_path / "ours"
    tag = convert(tmp_path / "mds", out, tp, pp, vocab_size=VOCAB)
    assert tag == out / "iter_0000000"
    assert layout.read_run_config(tag)["model"]["seq_length"] == 64
    assert_same_checkpoint(out, from_hf(bloom, tmp_path, tp, pp))


def converted_logits(tag: Path, config: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    """Logits of our model loaded from a tp=1, pp=1 converted tag dir."""
    state = {}
    for pipe_layer in layout.pipeline_layers(config):
        shard = torch.load(layout.layer_file(tag, pipe_layer.index, 0), weights_only=True)
        state.update({pipe_layer.prefix + k: v for k, v in shard.items()})
    ours = build_model(config.replace(fused_ops=False))
    ours.load_state_dict(state, strict=True)
    with torch.no_grad():
        return gather_vocab_parallel_logits(ours(ids), None, config.vocab_size)


def test_converted_model_computes_hf_logits(bloom, megatron_enums, tmp_path):
    write_megatron(tmp_path / "mds", bloom["state"], megatron_args())
    tag = convert(tmp_path / "mds" / "global_step7", tmp_path / "ours", vocab_size=VOCAB)
    logits = converted_logits(tag, bloom["config"], bloom["ids"])
    torch.testing.assert_close(logits, bloom["logits"], atol=1e-4, rtol=0)


def test_hf_config_instead_of_args_keeps_padded_rows(bloom, tmp_path):
    """No mp_rank files: --hf-config gives the shape; without --vocab-size the padded table
    (as HF BLOOM keeps its 250,880 rows) is the vocabulary."""
    write_megatron(tmp_path / "mds", bloom["state"], args=None)
    with pytest.raises(UserError, match="--hf-config"):
        convert(tmp_path / "mds", tmp_path / "no_config")
    hf_config = json.loads((bloom["hf_dir"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "vocab_size": PADDED}))
    tag = convert(tmp_path / "mds", tmp_path / "ours", hf_config=tmp_path / "config.json")
    emb = torch.load(layout.layer_file(tag, 0, 0), weights_only=True)["word_embeddings.weight"]
    assert torch.equal(emb, bloom["state"]["transformer.word_embeddings.weight"])
    assert layout.read_run_config(tag)["model"]["vocab_size"] == PADDED


def test_universal_checkpoint_converts_like_hf(bloom, megatron_enums, tmp_path):
    """zero/ fp32 masters win over the layer files ds_to_universal copies beside them."""
    tag_dir = write_universal(tmp_path / "uc", bloom["state"], megatron_args())
    stale = {k: v + 1.0 for k, v in bloom["state"].items()}
    for index, tensors in megatron_layers(stale).items():
        torch.save(tensors, tag_dir / f"layer_{index:02d}-model_00-model_states.pt")
    out = tmp_path / "ours"
    convert(tmp_path / "uc", out, 2, 1)  # vocabulary: the universal table's 250 rows
    assert_same_checkpoint(out, from_hf(bloom, tmp_path, 2, 1))
    shutil.rmtree(tag_dir / "zero" / "3.mlp.dense_h_to_4h.bias")  # block 0
    with pytest.raises(UserError, match=r"zero/3\.mlp\.dense_h_to_4h\.bias/fp32\.pt is missing"):
        convert(tmp_path / "uc", tmp_path / "incomplete")
    assert not (tmp_path / "incomplete").exists()


def test_drifted_replicated_tensors_are_averaged(bloom, megatron_enums, tmp_path):
    tag_dir = write_megatron(tmp_path / "mds", bloom["state"], megatron_args())
    path = tag_dir / "layer_04-model_01-model_states.pt"  # block 1, tp rank 1
    shard = torch.load(path, weights_only=True)
    shard["input_layernorm.weight"] = shard["input_layernorm.weight"] + 1e-3
    torch.save(shard, path)
    tag = convert(tmp_path / "mds", tmp_path / "ours", vocab_size=VOCAB)
    got = torch.load(layout.layer_file(tag, 2, 0), weights_only=True)["input_norm.weight"]
    rank0 = bloom["state"]["transformer.h.1.input_layernorm.weight"]
    expected = ((rank0.double() + shard["input_layernorm.weight"].double()) / 2).float()
    assert torch.equal(got, expected) and not torch.equal(got, rank0)


class RunsCode:
    """A pickle payload that runs a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    "victim", ["layer_03-model_01-model_states.pt", "mp_rank_00_model_states.pt"]
)
def test_pickle_that_runs_code_is_refused(bloom, megatron_enums, tmp_path, victim):
    tag_dir = write_megatron(tmp_path / "mds", bloom["state"], megatron_args())
    marker = tmp_path / "pwned"
    torch.save({"input_layernorm.weight": RunsCode(marker)}, tag_dir / victim)
    with pytest.raises(UserError, match="refused") as err:
        convert(tmp_path / "mds", tmp_path / "out" / "ours", vocab_size=VOCAB)
    assert victim in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "out" / "ours").exists() and not leftovers(tmp_path / "out")


def test_missing_layer_file_is_a_clear_error_and_leaves_nothing(bloom, megatron_enums, tmp_path):
    tag_dir = write_megatron(tmp_path / "mds", bloom["state"], megatron_args())
    (tag_dir / "layer_04-model_01-model_states.pt").unlink()
    out = tmp_path / "out" / "ours"
    args = ["convert", "from-megatron-deepspeed", "--input", str(tmp_path / "mds")]
    args += ["--output", str(out), "--tp", "2", "--pp", "2"]
    with pytest.raises(UserError, match=r"layer_04-model_01-model_states\.pt is missing"):
        convert(tmp_path / "mds", out, 2, 2)
    assert cli_main(args) == 2
    assert not out.exists() and not (tmp_path / "out").exists()
    (tag_dir / "layer_04-model_01-model_states.pt").write_bytes(b"truncated")  # bad, not missing
    with pytest.raises(UserError, match="layer_04-model_01"):
        convert(tmp_path / "mds", out, 2, 2)
    assert not out.exists() and not leftovers(tmp_path / "out")


def test_cli_and_non_bloom_args(bloom, megatron_enums, tmp_path):
    write_megatron(tmp_path / "mds", bloom["state"], megatron_args())
    out = tmp_path / "ours"
    args = ["convert", "from-megatron-deepspeed", "--input", str(tmp_path / "mds")]
    assert (
        cli_main([*args, "--output", str(out), "--vocab-size", str(VOCAB), "--dtype", "bf16"]) == 0
    )
    shard = torch.load(layout.layer_file(out / "iter_0000000", 1, 0), weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in shard.values())
    rotary = tmp_path / "rotary"
    write_megatron(rotary, bloom["state"], megatron_args(PositionEmbeddingType.rotary))
    with pytest.raises(UserError, match="position_embedding_type"):
        convert(rotary, tmp_path / "rotary_out")
    wide = tmp_path / "wide"
    write_megatron(wide, bloom["state"], megatron_args(ffn_hidden_size=3 * HIDDEN))
    with pytest.raises(UserError, match=f"needs ffn_hidden_size={4 * HIDDEN}, got {3 * HIDDEN}"):
        convert(wide, tmp_path / "wide_out")
