"""`convert from-megatron-deepspeed` for Llama-architecture models (Megatron-DeepSpeed trained
with --swiglu --normalization rmsnorm --use-rotary-position-embeddings
--untie-embeddings-and-output-weights --num-key-value-heads): layer files built here by
Megatron's row rules from a tiny random GQA Llama, at TP=2, convert to exactly what
`convert from-hf` makes of the same HF model, and the result computes HF's logits."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.convert import layout
from megatron_ext.convert.megatron_deepspeed import convert
from megatron_ext.errors import UserError
from megatron_ext.models import ModelConfig
from tests.convert.test_megatron_deepspeed import (
    assert_same_checkpoint,
    converted_logits,
    from_hf,
    leftovers,
    write_mp_rank_files,
)
from tests.models.hf_cases import hf_model

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, PADDED = 3, 64, 4, 2, 96, 250, 256
HN = HIDDEN // HEADS
SRC_TP = 2


def _llama(tmp_path_factory, tied: bool) -> dict:
    config = ModelConfig(
        family="llama", num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_kv_heads=KV_HEADS, ffn_hidden_size=FFN, vocab_size=VOCAB, seq_length=64,
        position_embedding="rope", norm="rmsnorm", embedding_layernorm=False,
        activation="swiglu", tied_embeddings=tied, bias=False, rope_theta=10000.0,
    )  # fmt: skip
    model = hf_model(config, seed=11)
    hf_dir = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"config": config, "hf_dir": hf_dir, "state": state, "ids": ids, "logits": logits}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _llama(tmp_path_factory, tied=False)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    return _llama(tmp_path_factory, tied=True)


def _padded(table: torch.Tensor, seed: int) -> torch.Tensor:
    """Megatron's vocabulary padding rows (trained weights too, dropped by the conversion)."""
    extra = torch.randn(PADDED - VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed))
    return torch.cat([table, extra])


def _qkv_rank(state: dict, prefix: str, rank: int) -> torch.Tensor:
    """Rank `rank`'s fused rows: for each of its kv groups, the group's query heads, k, v."""
    q, k, v = (state[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv")
    g, per_rank = HEADS // KV_HEADS, KV_HEADS // SRC_TP
    rows = []
    for group in range(rank * per_rank, (rank + 1) * per_rank):
        rows += [q[group * g * HN : (group + 1) * g * HN], k[group * HN : (group + 1) * HN]]
        rows.append(v[group * HN : (group + 1) * HN])
    return torch.cat(rows)


def _block_rank(state: dict, i: int, rank: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    gate = state[p + "mlp.gate_proj.weight"].chunk(SRC_TP)[rank]
    up = state[p + "mlp.up_proj.weight"].chunk(SRC_TP)[rank]
    return {
        "input_layernorm.weight": state[p + "input_layernorm.weight"].clone(),
        "self_attention.query_key_value.weight": _qkv_rank(state, p, rank),
        "self_attention.dense.weight": state[p + "self_attn.o_proj.weight"].chunk(SRC_TP, 1)[rank],
        "post_attention_layernorm.weight": state[p + "post_attention_layernorm.weight"].clone(),
        "mlp.dense_h_to_4h.weight": torch.cat([gate, up]),  # this rank's gate, then its up
        "mlp.dense_4h_to_h.weight": state[p + "mlp.down_proj.weight"].chunk(SRC_TP, 1)[rank],
    }


def write_llama_megatron(root: Path, state: dict, args: argparse.Namespace | None) -> Path:
    """GPTModelPipe files: 1 embedding, 2..L+1 blocks, L+2 final RMSNorm, L+3 lm_head (none
    when the embedding is tied: the last stage re-uses it)."""
    tag_dir = root / "global_step9"
    tag_dir.mkdir(parents=True)
    emb = _padded(state["model.embed_tokens.weight"], 4)
    untied = args is None or args.untie_embeddings_and_output_weights
    head = _padded(state["lm_head.weight"], 5) if untied else None
    for rank in range(SRC_TP):
        layers = {
            1: {"word_embeddings.weight": emb.chunk(SRC_TP)[rank]},
            LAYERS + 2: {"weight": state["model.norm.weight"].clone()},
        }
        if head is not None:
            layers[LAYERS + 3] = {"lm_head.weight": head.chunk(SRC_TP)[rank]}
        layers.update({2 + i: _block_rank(state, i, rank) for i in range(LAYERS)})
        for index, tensors in layers.items():
            tensors = {k: v.clone() for k, v in tensors.items()}  # no shared storage on disk
            torch.save(tensors, tag_dir / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")
    if args is not None:
        write_mp_rank_files(tag_dir, args)
    (root / "latest").write_text(tag_dir.name)
    return tag_dir


def llama_args(**changes) -> argparse.Namespace:
    """The args Microsoft/LumiOpen Megatron-DeepSpeed saves for a Llama-architecture run."""
    args = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, seq_length=64, max_position_embeddings=64,
        padded_vocab_size=PADDED, make_vocab_size_divisible_by=128, layernorm_epsilon=1e-5,
        init_method_std=0.02, tensor_model_parallel_size=SRC_TP, pipeline_model_parallel_size=2,
        swiglu=True, normalization="rmsnorm", use_rotary_position_embeddings=True,
        rope_theta=10000.0, untie_embeddings_and_output_weights=True, add_bias_linear=False,
        apply_residual_connection_post_layernorm=False, bf16=False, add_position_embedding=False,
        rotary_percent=1.0, kv_channels=HN,
    )  # fmt: skip
    return argparse.Namespace(**{**args, **changes})


def universal_from_layer_files(tag_dir: Path, root: Path, args: argparse.Namespace) -> Path:
    """zero/<param>/fp32.pt as DeepSpeed's ds_to_universal merges Megatron-DeepSpeed's TP
    shards with the model's universal_checkpoint_info (deepspeed/checkpoint/ds_to_universal.py,
    merge_tp_slices): replicated -> rank 0's; row parallel -> cat on dim 1; SwiGLU's
    dense_h_to_4h (two sub-parameters) -> all ranks' first halves, then all second halves;
    anything else (QKV, vocabulary) -> cat on dim 0; vocabulary tables cut to the tokenizer's
    size. Parameter names: "<pipeline layer>.<key>", "tied_modules.embed.<key>" when tied."""
    out = root / "global_step9_universal"
    tied = not args.untie_embeddings_and_output_weights
    files = sorted(tag_dir.glob("layer_*-model_00-model_states.pt"))
    for path in files:
        index = int(path.name[6:8])
        for key in torch.load(path, weights_only=True):
            slices = [
                torch.load(path.with_name(path.name.replace("model_00", f"model_{r:02d}")),
                           weights_only=True)[key]
                for r in range(SRC_TP)
            ]  # fmt: skip
            if key.endswith("layernorm.weight") or key == "weight":
                full = slices[0]
            elif key in ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight"):
                full = torch.cat(slices, dim=1)
            elif key == "mlp.dense_h_to_4h.weight":
                halves = [s.chunk(2) for s in slices]
                full = torch.cat(
                    [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
                )
            else:
                full = torch.cat(slices)
            if key in ("word_embeddings.weight", "lm_head.weight"):
                full = full[:VOCAB]
            name = (
                f"tied_modules.embed.{key}"
                if tied and key == "word_embeddings.weight"
                else f"{index}.{key}"
            )
            (out / "zero" / name).mkdir(parents=True)
            torch.save(
                {"param": full.float().clone(), "cat_dim": 0}, out / "zero" / name / "fp32.pt"
            )
    write_mp_rank_files(out, args)
    (root / "latest_universal").write_text(out.name)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_llama_universal_checkpoint_converts_like_hf(llama, tied_llama, tmp_path, tied):
    """Llama universal checkpoints are read like BLOOM's: the fused QKV rows (grouped per kv
    head) and the SwiGLU [gate; up] rows as DeepSpeed merges them."""
    model = tied_llama if tied else llama
    args = llama_args(untie_embeddings_and_output_weights=not tied)
    tag_dir = write_llama_megatron(tmp_path / "mds", model["state"], args)
    universal_from_layer_files(tag_dir, tmp_path / "uc", args)
    out = tmp_path / "ours"
    convert(tmp_path / "uc", out, 2, 2)  # vocabulary: the universal table's rows
    assert_same_checkpoint(out, from_hf(model, tmp_path, 2, 2))
    missing = tmp_path / "uc" / "global_step9_universal" / "zero" / "3.mlp.dense_h_to_4h.weight"
    shutil.rmtree(missing)
    with pytest.raises(UserError, match=r"zero/3\.mlp\.dense_h_to_4h\.weight/fp32\.pt is missing"):
        convert(tmp_path / "uc", tmp_path / "out")


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 2)])
def test_llama_layer_files_convert_like_hf(llama, tmp_path, tp, pp):
    write_llama_megatron(tmp_path / "mds", llama["state"], llama_args())
    out = tmp_path / "ours"
    convert(tmp_path / "mds", out, tp, pp, vocab_size=VOCAB)
    assert_same_checkpoint(out, from_hf(llama, tmp_path, tp, pp))


def test_tied_llama_has_no_head_file_and_converts_like_hf(tied_llama, tmp_path):
    args = llama_args(untie_embeddings_and_output_weights=False)
    tag_dir = write_llama_megatron(tmp_path / "mds", tied_llama["state"], args)
    assert not (tag_dir / f"layer_{LAYERS + 3:02d}-model_00-model_states.pt").exists()
    out = tmp_path / "ours"
    convert(tmp_path / "mds", out, 2, 2, vocab_size=VOCAB)
    assert layout.read_run_config(out / "iter_0000000")["model"]["tied_embeddings"] is True
    assert_same_checkpoint(out, from_hf(tied_llama, tmp_path, 2, 2))


def test_converted_llama_computes_hf_logits(llama, tmp_path):
    write_llama_megatron(tmp_path / "mds", llama["state"], llama_args())
    tag = convert(tmp_path / "mds", tmp_path / "ours", vocab_size=VOCAB)
    assert layout.read_run_config(tag)["model"]["num_kv_heads"] == KV_HEADS
    logits = converted_logits(tag, llama["config"], llama["ids"])
    torch.testing.assert_close(logits, llama["logits"], atol=1e-4, rtol=0)


def test_swapped_gate_and_up_would_be_caught(llama, tmp_path):
    """The row order matters: a source whose ranks hold [up; gate] converts to other weights."""
    tag_dir = write_llama_megatron(tmp_path / "mds", llama["state"], llama_args())
    for rank in range(SRC_TP):
        path = tag_dir / f"layer_02-model_{rank:02d}-model_states.pt"
        shard = torch.load(path, weights_only=True)
        gate, up = shard["mlp.dense_h_to_4h.weight"].chunk(2)
        shard["mlp.dense_h_to_4h.weight"] = torch.cat([up, gate])
        torch.save(shard, path)
    out = tmp_path / "ours"
    convert(tmp_path / "mds", out, 1, 1, vocab_size=VOCAB)
    with pytest.raises(AssertionError):
        assert_same_checkpoint(out, from_hf(llama, tmp_path, 1, 1))


def test_llama_refusals_leave_nothing(llama, tmp_path):
    write_llama_megatron(tmp_path / "mds", llama["state"], llama_args(add_bias_linear=True))
    with pytest.raises(UserError, match="add_bias_linear=True.*not a Llama-architecture"):
        convert(tmp_path / "mds", tmp_path / "out" / "a")
    shutil.rmtree(tmp_path / "mds")
    write_llama_megatron(tmp_path / "mds", llama["state"], llama_args(rotary_percent=0.5))
    with pytest.raises(UserError, match="rotary_percent=0.5"):
        convert(tmp_path / "mds", tmp_path / "out" / "a")
    shutil.rmtree(tmp_path / "mds")
    write_llama_megatron(tmp_path / "mds", llama["state"], llama_args(normalization="layernorm"))
    with pytest.raises(UserError, match="normalization='layernorm' \\(needs 'rmsnorm'\\)"):
        convert(tmp_path / "mds", tmp_path / "out" / "a")  # named against the closest family
    shutil.rmtree(tmp_path / "mds")
    write_llama_megatron(tmp_path / "mds", llama["state"], llama_args(kv_channels=HN // 2))
    with pytest.raises(UserError, match=f"kv_channels={HN // 2}"):
        convert(tmp_path / "mds", tmp_path / "out" / "a")
    shutil.rmtree(tmp_path / "mds")
    tag_dir = write_llama_megatron(tmp_path / "mds", llama["state"], llama_args())
    (tag_dir / f"layer_{LAYERS + 3:02d}-model_01-model_states.pt").unlink()  # lm_head, rank 1
    with pytest.raises(UserError, match=f"layer_{LAYERS + 3:02d}-model_01.*is missing"):
        convert(tmp_path / "mds", tmp_path / "out" / "b")
    assert not leftovers(tmp_path / "out") and not any((tmp_path / "out").glob("*"))
