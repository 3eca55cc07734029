"""Throughput accounting: training FLOPs per token, TFLOPs per device and MFU.

Per token of a sequence of length s, for a model with L blocks, hidden size h, np query heads
and nkv key/value heads of size hn, FFN size f and padded vocabulary V, one forward pass does
these matrix FLOPs (2 per multiply-add):

    qkv    2 h (np + 2 nkv) hn          attention  2 · 2 s np hn   (q kᵀ and probs · v; the
    proj   2 np hn h                                                full s × s square, as
    mlp    2 h f (x2 for SwiGLU's gate) + 2 f h                      Megatron counts it)
    logits 2 h V

Backward costs twice the forward, so

    model FLOPs per token    = 3 · (L · block + logits)                      (no recompute)
    hardware FLOPs per token = model + L · block when activations are recomputed
                               (train.activation_checkpointing full or every: DeepSpeed
                               recomputes every block once in backward; Megatron's convention),
                               model + L · attention core under selective recompute

For a BLOOM-style block without GQA this is Megatron's 72 L h² (1 + s/(6h)) + 6 V h, and close
to the common 6 N + 12 L h s. TFLOPs per device = FLOPs per token · tokens per step / step
time / number of devices / 1e12, and MFU (HFU) = model (hardware) TFLOPs / the device's dense
bf16 peak: `logging.peak_tflops`, else the table below, matched on the device's name.
"""

from __future__ import annotations

import torch

from megatron_ext.models.config import ModelConfig

# Dense bf16 peak TFLOP/s per device, from the vendors' data sheets (no sparsity):
# A100 SXM/PCIe 312; H100 SXM 989 (H100 PCIe is 756: set logging.peak_tflops there);
# H200 989 (same compute as H100 SXM); MI250X 383 per package = 191.5 per GCD (one torch device).
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "MI250X": 191.5}


def block_forward_flops(model: ModelConfig, seq_length: int) -> float:
    """Matrix FLOPs of one transformer block's forward, per token."""
    h, hn = model.hidden_size, model.head_dim
    np_, nkv, f = model.num_attention_heads, model.num_kv_heads, model.ffn_hidden_size
    qkv = 2 * h * (np_ + 2 * nkv) * hn
    proj = 2 * np_ * hn * h
    mlp = 2 * h * f * (2 if model.activation == "swiglu" else 1) + 2 * f * h
    attention = 2 * 2 * seq_length * np_ * hn
    return float(qkv + proj + mlp + attention)


def model_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token without recomputation (see the module docstring)."""
    logits = 2 * model.hidden_size * model.padded_vocab_size(1)
    return 3.0 * (model.num_layers * block_forward_flops(model, seq_length) + logits)


def attention_core_flops(model: ModelConfig, seq_length: int) -> float:
    """Matrix FLOPs of the attention core (q kᵀ and probs · v) of one block, per token."""
    return float(2 * 2 * seq_length * model.num_attention_heads * model.head_dim)


def hardware_flops_per_token(model: ModelConfig, seq_length: int, recompute: str) -> float:
    """Training FLOPs per token including recomputation (`train.activation_checkpointing`):
    full/every recompute each block's forward once more, selective only its attention core."""
    if recompute == "none":
        extra = 0.0
    elif recompute == "selective":
        extra = model.num_layers * attention_core_flops(model, seq_length)
    else:
        extra = model.num_layers * block_forward_flops(model, seq_length)
    return model_flops_per_token(model, seq_length) + extra


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The device's dense bf16 peak (TFLOP/s): `override`, else by GPU name; None on CPU or
    an unknown GPU (no MFU then)."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def throughput(
    flops_per_token: tuple[float, float], tokens: int, seconds: float, devices: int, peak
) -> dict:
    """{"tflops_per_device", "hw_tflops_per_device", "mfu", "hfu"} of one step; mfu/hfu None
    without a peak. flops_per_token = (model, hardware)."""
    model, hardware = (f * tokens / seconds / devices / 1e12 for f in flops_per_token)
    return {
        "tflops_per_device": model,
        "hw_tflops_per_device": hardware,
        "mfu": model / peak if peak else None,
        "hfu": hardware / peak if peak else None,
    }
