"""Reference data for the parity tests: HF models with random weights and their outputs.

Each case is built from a ModelConfig through the family's `to_hf_config`, with the HF model's
weights (norms and biases included) perturbed from a seed, so nothing is downloaded. The
TP=1 loss and gradients come from our model loaded with the same weights (the gradients are
stored under HF names, so any TP size can cut its expected shard with the key map).
"""

from __future__ import annotations

import torch

from megatron_ext.models import ModelConfig, build_model, get_family
from megatron_ext.models.keymap import hf_to_ours, merge_to_hf
from megatron_ext.parallel.tensor_parallel import gather_vocab_parallel_logits

SEQ, BATCH = 12, 2

CASES = {
    # ALiBi with 12 heads (not a power of 2), a GPT-2-sized vocabulary that pads differently
    # at TP=1/2/4 (50304 / 50432 / 50688).
    "bloom-odd": dict(
        family="bloom", num_layers=2, hidden_size=96, num_attention_heads=12, vocab_size=50257,
        seq_length=64,
    ),
    # GQA: 8 heads over 2 kv heads; TP=2 splits the kv heads, TP=4 replicates them.
    "llama-gqa": dict(
        family="llama", num_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
        ffn_hidden_size=160, vocab_size=777, seq_length=64, position_embedding="rope",
        norm="rmsnorm", embedding_layernorm=False, activation="swiglu", tied_embeddings=False,
        bias=False, rope_theta=10000.0,
    ),
    # Llama recipe with biases and tied embeddings.
    "llama-bias-tied": dict(
        family="llama", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
        vocab_size=1000, seq_length=64, position_embedding="rope", norm="rmsnorm",
        embedding_layernorm=False, activation="swiglu", tied_embeddings=True, bias=True,
        rope_theta=500000.0, layernorm_epsilon=1e-6,
    ),
}  # fmt: skip


def hf_model(config: ModelConfig, seed: int):
    """A transformers model of `config` with seeded random weights (eager attention, fp32)."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    family = get_family(config.family)
    cls, cfg_cls = {
        "bloom": (BloomForCausalLM, BloomConfig),
        "llama": (LlamaForCausalLM, LlamaConfig),
    }[config.family]
    torch.manual_seed(seed)
    model = cls(cfg_cls(**family.to_hf_config(config), attn_implementation="eager")).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases away from 1 and 0
            p.add_(torch.randn_like(p) * 0.05)
    return model


def build_case(name: str, seed: int = 0) -> dict:
    """HF weights, inputs, HF logits, and our TP=1 loss and gradients (under HF names)."""
    config = ModelConfig(**CASES[name])
    family = get_family(config.family)
    hf = hf_model(config, seed)
    hf_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
    labels = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
    with torch.no_grad():
        hf_logits = hf(ids).logits

    ours = build_model(config.replace(fused_ops=False))
    ours.load_state_dict(hf_to_ours(hf_state, family, config), strict=True)
    loss = ours(ids, labels=labels).mean()
    loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}
    logits = gather_vocab_parallel_logits(ours(ids), None, config.vocab_size).detach()
    return {
        "config": config.to_dict(),
        "hf_state": hf_state,
        "ids": ids,
        "labels": labels,
        "hf_logits": hf_logits,
        "tp1_logits": logits,
        "tp1_loss": loss.detach(),
        "tp1_grads_hf": merge_to_hf([grads], family, config),
    }
