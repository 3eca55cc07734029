"""Our TP layers and cross entropy against megatron-core 0.16.1's shim-free tensor_parallel.

megatron-core runs as shipped on gloo: parallel_state.initialize_model_parallel, layers with
use_cpu_initialization=True and gather_output=False, vocab_parallel_cross_entropy without
label smoothing (its smoothing is wrong at TP > 1; ours is checked against torch instead).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed_utils import run_distributed_test

S, B, H, OUT, VOCAB = 6, 2, 16, 24, 64


def _close(a, b, what):
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"{what}: max diff {(a - b).abs().max()}"


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _megatron_worker(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as mtp
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_ext.parallel import ParallelContext
    from megatron_ext.parallel.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        normal_init,
        vocab_parallel_cross_entropy,
    )

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    ctx = ParallelContext.from_sizes(world_size)
    cfg = ModelParallelConfig(
        tensor_model_parallel_size=world_size,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    init = normal_init(0.05)
    layers = {
        "column": (
            lambda: mtp.ColumnParallelLinear(
                H, OUT, config=cfg, init_method=init, bias=True, gather_output=False
            ),
            lambda: ColumnParallelLinear(H, OUT, tp_group=ctx.tp_group, init_method=init),
        ),
        "row": (
            lambda: mtp.RowParallelLinear(
                OUT, H, config=cfg, init_method=init, bias=True, input_is_parallel=True,
                skip_bias_add=False,
            ),
            lambda: RowParallelLinear(OUT, H, tp_group=ctx.tp_group, init_method=init),
        ),
        "embedding": (
            lambda: mtp.VocabParallelEmbedding(VOCAB, H, init_method=init, config=cfg),
            lambda: VocabParallelEmbedding(VOCAB, H, tp_group=ctx.tp_group, init_method=init),
        ),
    }  # fmt: skip
    pairs = []
    for seed, (make_ref, make_ours) in enumerate(layers.values()):
        torch.manual_seed(seed)
        ref = make_ref()
        torch.manual_seed(seed)
        ours = make_ours()
        # Same CPU master-weight initialisation: the shards agree bit for bit.
        assert torch.equal(ref.weight, ours.weight), type(ours).__name__
        pairs.append((ref, ours))

    (ref_col, col), (ref_row, row), (ref_emb, emb) = pairs
    with torch.no_grad():
        ref_col.bias.normal_()
        col.bias.copy_(ref_col.bias)
        ref_row.bias.normal_()
        row.bias.copy_(ref_row.bias)

    torch.manual_seed(100)  # identical inputs on every rank
    ids = torch.randint(0, VOCAB, (S, B))
    target = torch.randint(0, VOCAB, (S, B))
    grad_out = torch.rand(S, B)

    def run(embedding, column, rowp, cross_entropy):
        h = embedding(ids)
        h = column(h)
        h = h[0] if isinstance(h, tuple) else h
        h = torch.tanh(h)
        h = rowp(h)
        h = h[0] if isinstance(h, tuple) else h
        logits = torch.nn.functional.linear(h, embedding.weight)  # vocab-parallel [s, b, V/tp]
        loss = cross_entropy(logits, target)
        loss.backward(grad_out)
        return loss.detach()

    ref_loss = run(ref_emb, ref_col, ref_row, mtp.vocab_parallel_cross_entropy)
    loss = run(emb, col, row, lambda lg, t: vocab_parallel_cross_entropy(lg, t, ctx.tp_group))
    _close(loss, ref_loss, "loss")
    for (ref_mod, mod), name in zip(pairs, ("column", "row", "embedding"), strict=True):
        ref_grads, grads = _grads(ref_mod), _grads(mod)
        for key in grads:
            _close(grads[key], ref_grads[key], f"{name}.{key} grad")
    parallel_state.destroy_model_parallel()
    return loss.sum().item()


@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 4])
def test_layers_and_cross_entropy_match_megatron_core(tp):
    pytest.importorskip("megatron.core")
    losses = run_distributed_test(_megatron_worker, tp, timeout_s=180)
    assert len(set(losses)) == 1  # every TP rank computes the same loss
