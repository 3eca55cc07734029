"""ModelConfig (YAML, overrides, validation), the stage structure, and TP behaviour beyond HF
parity: learned positions under sequence parallelism, dropout across TP ranks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from megatron_ext.errors import UserError
from megatron_ext.models import (
    EmbeddingStage,
    HeadStage,
    ModelConfig,
    TransformerBlock,
    build_model,
    build_stage,
    get_family,
    get_preset,
    resolve_model_config,
)
from megatron_ext.models.keymap import KeyMapEntry, hf_to_ours, merge_to_hf
from megatron_ext.models.presets import load_model_yaml
from megatron_ext.parallel import ParallelContext, allreduce_tp_duplicated_grads
from megatron_ext.parallel.tensor_parallel import gather_vocab_parallel_logits
from tests.distributed_utils import run_distributed_test


def test_yaml_round_trip_and_overrides(tmp_path):
    config = get_preset("tiny-llama")
    path = tmp_path / "model.yaml"
    config.save_yaml(path)
    assert load_model_yaml(path) == config
    changed = load_model_yaml(path, ["num_layers=3", "rope_theta=5e5"])
    assert changed.num_layers == 3 and changed.rope_theta == 500000.0
    assert config.with_overrides(["bias=true"]).bias is True
    path.write_text("preset: fingpt-186m\nseq_length: 1024\n")
    assert load_model_yaml(path) == get_preset("fingpt-186m").replace(seq_length=1024)
    assert resolve_model_config({"preset": "tiny", "hidden_size": 96}).ffn_hidden_size == 384
    assert resolve_model_config("tiny") == get_preset("tiny")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hidden_size": 60, "num_attention_heads": 7}, "divisible"),
        ({"num_attention_heads": 4, "num_kv_heads": 3}, "multiple"),
        ({"position_embedding": "sinusoid"}, "not one of"),
        ({"hidden_dropout": 1.0}, "hidden_dropout"),
        ({"unknown_field": 1}, "unknown key"),
    ],
)
def test_config_errors_say_what_is_wrong(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), **fields})


def test_vocab_padding_and_tp_checks():
    config = get_preset("tiny").replace(vocab_size=50257)
    assert [config.padded_vocab_size(t) for t in (1, 2, 4, 8)] == [50304, 50432, 50688, 51200]
    with pytest.raises(UserError, match="tp=3"):
        get_preset("tiny").check_tp(3)
    get_preset("tiny-llama").check_tp(4)  # 2 kv heads replicate over 4 ranks
    with pytest.raises(UserError, match="kv heads"):
        get_preset("tiny-llama").replace(
            hidden_size=96, num_attention_heads=12, num_kv_heads=3
        ).check_tp(4)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_stages_compose_to_the_model(preset):
    config = get_preset(preset)
    model = build_model(config, seed=3).eval()
    stages = model.stages
    assert isinstance(stages[0], EmbeddingStage) and isinstance(stages[-1], HeadStage)
    assert all(isinstance(s, TransformerBlock) for s in stages[1:-1])
    assert len(stages) == config.num_layers + 2
    ids = torch.randint(0, config.vocab_size, (2, 9))
    x = ids
    for stage in stages:
        x = stage(x)
    assert torch.equal(x, model(ids))
    assert x.shape == (2, 9, config.padded_vocab_size())
    # Stages built one by one (as a pipeline stage would) get the same weights.
    block = build_stage(config, ParallelContext.single(), 2, seed=3)
    for (n, p), (_, q) in zip(
        block.named_parameters(), model.layers[1].named_parameters(), strict=True
    ):
        assert torch.equal(p, q), n
    names = [n for n, _ in model.named_parameters()]
    assert ("head.output_layer.weight" in names) != config.tied_embeddings
    if config.tied_embeddings:
        assert "head.word_embeddings.weight" not in model.state_dict()  # saved once


def test_loss_ignores_padding_and_matches_torch():
    config = get_preset("tiny").replace(vocab_size=1000)
    model = build_model(config, seed=0)
    ids = torch.randint(0, 1000, (2, 7))
    labels = torch.randint(0, 1000, (2, 7))
    logits = model(ids)
    with torch.no_grad():
        logits[..., 1000:] = 1e4  # padding columns would dominate if they leaked
    ref = torch.nn.functional.cross_entropy(
        logits[..., :1000].reshape(-1, 1000), labels.reshape(-1), reduction="none"
    )
    assert torch.allclose(model.loss(logits, labels).reshape(-1), ref, atol=1e-5)


def test_fused_and_reference_ops_agree():
    for preset in ("tiny", "tiny-llama"):
        config = get_preset(preset)
        ids = torch.randint(0, config.vocab_size, (2, 11))
        ref = build_model(config.replace(fused_ops=False), seed=1)(ids)
        fused = build_model(config.replace(fused_ops=True), seed=1)(ids)
        assert torch.allclose(ref, fused, atol=1e-5), preset


def test_right_padding_mask_keeps_real_positions():
    config = get_preset("tiny-llama")
    model = build_model(config, seed=2).eval()
    ids = torch.randint(0, config.vocab_size, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        assert torch.allclose(model(padded, attention_mask=mask)[:, :6], model(ids), atol=1e-5)


def test_meta_build_of_a_large_preset_allocates_nothing():
    model = build_model(get_preset("fingpt-13b"), device="meta")
    assert all(p.is_meta for p in model.parameters())


def _gpt_config(**extra) -> ModelConfig:
    """BLOOM recipe with learned positions and dropout: no HF twin, checked against TP=1."""
    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=999, seq_length=16,
        position_embedding="learned", embedding_layernorm=False, fused_ops=False,
    )  # fmt: skip
    return ModelConfig(**{**fields, **extra})


_POSITIONS = KeyMapEntry("embedding.position_embeddings", ("position_embeddings",))


def _gpt_family():
    bloom = get_family("bloom")
    keys = tuple(e for e in bloom.key_map if not e.ours.startswith("embedding.norm"))
    return dataclasses.replace(bloom, key_map=(*keys, _POSITIONS))


def _sp_worker(rank, world_size, tp1_logits, tp1_grads_hf, ids, labels):
    out = {}
    family, config = _gpt_family(), _gpt_config()
    for sp in (False, True):
        ctx = ParallelContext.from_sizes(world_size, sequence_parallel=sp)
        model = build_model(config, ctx, seed=11)  # seeded: same weights as the TP=1 build
        logits = model(ids)
        gathered = gather_vocab_parallel_logits(logits.detach(), ctx.tp_group, config.vocab_size)
        model.loss(logits, labels).mean().backward()
        allreduce_tp_duplicated_grads(model, ctx)
        expected = hf_to_ours(tp1_grads_hf, family, config, ctx.tp_rank, ctx.tp_size)
        worst = max((p.grad - expected[n]).abs().max().item() for n, p in model.named_parameters())
        out[sp] = ((gathered - tp1_logits).abs().max().item(), worst)

    # Dropout: the residual stream stays identical over TP ranks; attention dropout differs.
    ctx = ParallelContext.from_sizes(world_size)
    ctx.seed(5)
    block = build_model(_gpt_config(hidden_dropout=0.3, attention_dropout=0.3), ctx, seed=1).layers[
        0
    ]
    x = torch.randn(16, 2, 64, generator=torch.Generator().manual_seed(0))
    y = block.train()(x)
    ys = [torch.empty_like(y) for _ in range(world_size)]
    dist.all_gather(ys, y.detach())
    out["dropout_same"] = all(torch.equal(ys[0], t) for t in ys)
    out["dropout_active"] = not torch.allclose(y, block.eval()(x))
    return out


@pytest.mark.distributed
def test_learned_positions_sequence_parallel_and_dropout_at_tp2():
    config = _gpt_config()
    model = build_model(config, seed=11)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    labels = torch.randint(0, config.vocab_size, (2, 16))
    logits = model(ids)
    model.loss(logits, labels).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads_hf = merge_to_hf([grads], _gpt_family(), config)
    ref = gather_vocab_parallel_logits(logits.detach(), None, config.vocab_size)
    results = run_distributed_test(_sp_worker, 2, ref, grads_hf, ids, labels)
    for res in results:
        for sp in (False, True):
            logit_diff, grad_diff = res[sp]
            assert logit_diff < 1e-5 and grad_diff < 2e-5, (sp, logit_diff, grad_diff)
        assert res["dropout_same"] and res["dropout_active"]
