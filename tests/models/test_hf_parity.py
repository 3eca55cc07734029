"""Logits equal transformers' BloomForCausalLM / LlamaForCausalLM at TP=1, 2 and 4 (gloo), and
loss and every gradient at TP=2/4 (with and without sequence parallelism) equal TP=1."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_ext.models import ModelConfig, build_model, get_family
from megatron_ext.models.keymap import hf_to_ours, merge_to_hf
from megatron_ext.parallel import (
    ParallelContext,
    allreduce_tp_duplicated_grads,
    check_tp_drift,
    resync_tp_duplicated,
)
from megatron_ext.parallel.tensor_parallel import gather_vocab_parallel_logits
from tests.distributed_utils import run_distributed_test
from tests.models.hf_cases import CASES, build_case

LOGIT_TOL = 1e-4  # fp32, random weights
GRAD_TOL = 2e-5


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    data = {name: build_case(name) for name in CASES}
    path = tmp_path_factory.mktemp("hf-cases") / "cases.pt"
    torch.save(data, path)
    return data, str(path)


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fused", [False, True])
def test_tp1_logits_match_transformers(cases, name, fused):
    case = cases[0][name]
    config = ModelConfig(**case["config"]).replace(fused_ops=fused)
    family = get_family(config.family)
    model = build_model(config).eval()
    model.load_state_dict(hf_to_ours(case["hf_state"], family, config), strict=True)
    with torch.no_grad():
        logits = gather_vocab_parallel_logits(model(case["ids"]), None, config.vocab_size)
    assert logits.shape == case["hf_logits"].shape
    assert _max_diff(logits, case["hf_logits"]) < LOGIT_TOL
    # The key map round-trips the HF state dict exactly (padding removed again).
    back = merge_to_hf([model.state_dict()], family, config)
    assert set(back) == set(case["hf_state"])
    for key, value in case["hf_state"].items():
        assert torch.equal(back[key], value), key


def _check_case(case: dict, ctx: ParallelContext) -> dict:
    config = ModelConfig(**case["config"]).replace(fused_ops=False)
    family = get_family(config.family)
    model = build_model(config, ctx)
    model.load_state_dict(hf_to_ours(case["hf_state"], family, config, ctx.tp_rank, ctx.tp_size))
    ids, labels = case["ids"], case["labels"]
    logits = model(ids)
    full = gather_vocab_parallel_logits(logits.detach(), ctx.tp_group, config.vocab_size)
    hf_diff = _max_diff(full, case["hf_logits"])
    loss = model.loss(logits, labels).mean()
    loss.backward()
    allreduce_tp_duplicated_grads(model, ctx)
    expected = hf_to_ours(case["tp1_grads_hf"], family, config, ctx.tp_rank, ctx.tp_size)
    grad_diff = {n: _max_diff(p.grad, expected[n]) for n, p in model.named_parameters()}
    assert set(grad_diff) == set(expected)
    drift = _drift_round_trip(model, ctx)
    return {
        "hf_diff": hf_diff,
        "loss_diff": abs(loss.item() - case["tp1_loss"].item()),
        "grad_diff": grad_diff,
        "drift": drift,
    }


def _drift_round_trip(model, ctx: ParallelContext) -> list[dict]:
    """A few SGD steps keep duplicates identical; a perturbation is reported, then repaired."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reports = []
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        model(torch.randint(0, model.config.vocab_size, (2, 8)) * 0).sum().backward()
        allreduce_tp_duplicated_grads(model, ctx)
    opt.step()
    reports.append(check_tp_drift(model, ctx))
    if ctx.tp_rank == 1:
        with torch.no_grad():
            model.head.final_norm.weight[0] += 1e-3
    reports.append(check_tp_drift(model, ctx))
    resync_tp_duplicated(model, ctx)
    reports.append(check_tp_drift(model, ctx))
    return reports


def _parity_worker(rank, world_size, cases_path):
    cases = torch.load(cases_path, weights_only=False)
    torch.manual_seed(0)  # same drift-step inputs on all ranks
    out = {}
    for sp in (False, True):
        ctx = ParallelContext.from_sizes(world_size, sequence_parallel=sp)
        for name, case in cases.items():
            out[(name, sp)] = _check_case(case, ctx)
    dist.barrier()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_logits_loss_and_grads(cases, tp):
    results = run_distributed_test(_parity_worker, tp, cases[1], timeout_s=300)
    for rank, res in enumerate(results):
        for (name, sp), r in res.items():
            where = f"{name} tp={tp} sp={sp} rank={rank}"
            assert r["hf_diff"] < LOGIT_TOL, where
            assert r["loss_diff"] < 1e-5, where
            bad = {n: d for n, d in r["grad_diff"].items() if d > GRAD_TOL}
            assert not bad, f"{where}: gradients differ from TP=1: {bad}"
            after_steps, perturbed, repaired = r["drift"]
            assert after_steps["ok"] and after_steps["num_checked"] > 0, where
            assert not perturbed["ok"] and "head.final_norm.weight" in perturbed["drifted"], where
            assert repaired["ok"], where


def test_seeded_init_is_the_same_at_any_tp():
    """TP=1 weights cut with the key map equal what a TP=2 rank initialises (seeded stages)."""
    config = ModelConfig(**CASES["llama-gqa"])
    family = get_family(config.family)
    full = merge_to_hf([build_model(config, seed=7).state_dict()], family, config)
    again = merge_to_hf([build_model(config, seed=7).state_dict()], family, config)
    other = merge_to_hf([build_model(config, seed=8).state_dict()], family, config)
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert not torch.equal(
        full["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"]
    )


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_attention_backends_match_transformers(cases, name, backend):
    """torch's fused attention (ALiBi as a float bias for BLOOM) and FlexAttention (ALiBi as a
    score modification, padding as a block mask) give the reference logits too, with and
    without padded keys (flex: forward only on CPU)."""
    case = cases[0][name]
    config = ModelConfig(**case["config"]).replace(attention_backend=backend)
    family = get_family(config.family)
    model = build_model(config).eval()
    model.load_state_dict(hf_to_ours(case["hf_state"], family, config), strict=True)
    softmax_model = build_model(config.replace(attention_backend="softmax")).eval()
    softmax_model.load_state_dict(model.state_dict())
    ids = case["ids"]
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0  # right padding
    with torch.no_grad():
        logits = gather_vocab_parallel_logits(model(ids), None, config.vocab_size)
        padded = model(ids, attention_mask=mask)
        padded_ref = softmax_model(ids, attention_mask=mask)
    assert _max_diff(logits, case["hf_logits"]) < LOGIT_TOL
    assert _max_diff(padded[:, :-3], padded_ref[:, :-3]) < LOGIT_TOL
