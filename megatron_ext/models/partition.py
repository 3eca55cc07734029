"""How the fused weights split over tensor parallelism: which rows of the full fused QKV and
[gate; up] weights a TP rank holds. Pure functions of the config (no modules): the layers build
their shards with them and the Hugging Face key maps merge and split checkpoints with them.

Fused QKV rows are grouped per kv head: [nkv, g + 2, hn] (g query heads, then k and v).
"""

from __future__ import annotations

import torch

from megatron_ext.models.config import ModelConfig


def qkv_local_shape(config: ModelConfig, tp_size: int) -> tuple[int, int]:
    """(nkv_l, g_l): kv groups on this rank and query heads per local group."""
    nkv = config.num_kv_heads
    nkv_l = nkv // tp_size if nkv % tp_size == 0 else 1
    return nkv_l, config.num_attention_heads // tp_size // nkv_l


def qkv_partition(config: ModelConfig):
    """Partition of the fused QKV rows: (tp_rank, tp_size) -> row indices of the full weight."""
    nkv, hn = config.num_kv_heads, config.head_dim
    g = config.num_attention_heads // nkv

    def rows(tp_rank: int, tp_size: int) -> torch.Tensor | slice:
        config.check_tp(tp_size)
        per_group = (g + 2) * hn
        if nkv % tp_size == 0:
            n = nkv // tp_size * per_group
            return slice(tp_rank * n, (tp_rank + 1) * n)
        rep = tp_size // nkv  # ranks sharing one kv group
        group, sub = divmod(tp_rank, rep)
        g_l, base = g // rep, group * per_group
        q = torch.arange(base + sub * g_l * hn, base + (sub + 1) * g_l * hn)
        return torch.cat([q, torch.arange(base + g * hn, base + (g + 2) * hn)])

    return rows


def glu_partition(ffn: int):
    """Rows of the fused [gate; up] weight [2f, h] held by a rank: its gate chunk and up chunk."""

    def rows(tp_rank: int, tp_size: int) -> torch.Tensor:
        n = ffn // tp_size
        gate = torch.arange(tp_rank * n, (tp_rank + 1) * n)
        return torch.cat([gate, gate + ffn])

    return rows
