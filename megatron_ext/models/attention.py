"""Causal self-attention with heads split over TP ranks; ALiBi or rotary positions.

Shape legend
    s  sequence length          b  micro-batch size         h  hidden size
    np attention heads          nkv key/value heads         hn head dim (h / np)
    g  query heads per kv head (np / nkv)                   tp tensor-parallel size
    *_l: this rank's share (np_l = np / tp; nkv_l = nkv / tp, or 1 when kv heads replicate)

Fused QKV layout (full, before the TP split): rows [nkv, g + 2, hn] = for each kv group its
g query heads, then its key, then its value. With g = 1 this is exactly BLOOM's per-head
interleaved [np, 3, hn]; Llama's separate q/k/v are mapped into it by the key map. When
tp divides nkv each rank holds whole groups; when nkv divides tp (tp > nkv) each rank holds
g * nkv / tp query heads of one group plus a replica of that group's key and value, and the
replicas' gradients are summed over the TP group in backward.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megatron_ext import ops
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.core_attention import core_attention, resolve_backend
from megatron_ext.models.partition import qkv_local_shape, qkv_partition
from megatron_ext.parallel.context import ParallelContext
from megatron_ext.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    normal_init,
    scaled_normal_init,
)
from megatron_ext.parallel.tensor_parallel.random import recompute_with_tracker


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes [np] fp32 (BLOOM's formula, also for head counts that are not powers of 2)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = torch.pow(torch.tensor(base), torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = torch.arange(1, 1 + 2 * min(closest, num_heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(torch.tensor(extra_base), extra)])
    return slopes.float()


class _SumReplicatedKV(torch.autograd.Function):
    """Identity forward; backward sums the k/v rows' gradient over the ranks sharing them."""

    @staticmethod
    def forward(ctx, param, group, nkv, kv_index, g_l, hn):
        ctx.args = (group, nkv, kv_index, g_l, hn)
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        group, nkv, kv_index, g_l, hn = ctx.args
        grad = grad.contiguous().clone()
        rows = grad.view(g_l + 2, hn, *grad.shape[1:])
        buf = grad.new_zeros((nkv, 2, hn, *grad.shape[1:]))
        buf[kv_index] = rows[g_l:]
        dist.all_reduce(buf, group=group)
        rows[g_l:] = buf[kv_index]
        return grad, None, None, None, None, None


class RotaryEmbedding(nn.Module):
    """cos, sin tables [s, 1, 1, hn] (fp32) for positions 0..s-1, HF Llama convention."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self.inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        )
        self._cache: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < seq_len or self._cache[1] != device:
            pos = torch.arange(seq_len, device=device, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
            self._cache = (seq_len, device, emb.cos(), emb.sin())
        return self._cache[2][:seq_len], self._cache[3][:seq_len]


class SelfAttention(nn.Module):
    """[s(/tp), b, h] -> [s(/tp), b, h]: fused QKV (column-parallel), core attention on this
    rank's heads, output projection (row-parallel: all-reduce, or reduce-scatter with SP)."""

    def __init__(
        self,
        config: ModelConfig,
        ctx: ParallelContext,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config.check_tp(ctx.tp_size)
        self.config, self.ctx = config, ctx
        hn, np_ = config.head_dim, config.num_attention_heads
        self.np_l = np_ // ctx.tp_size
        self.nkv_l, self.g_l = qkv_local_shape(config, ctx.tp_size)
        nkv = config.num_kv_heads
        weight_fn = None
        if ctx.tp_size > nkv:
            kv_index = ctx.tp_rank // (ctx.tp_size // nkv)

            def weight_fn(p: torch.Tensor) -> torch.Tensor:
                return _SumReplicatedKV.apply(p, ctx.tp_group, nkv, kv_index, self.g_l, hn)

        kw = {"device": device, "dtype": dtype}
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size,
            (np_ + 2 * nkv) * hn,
            tp_group=ctx.tp_group,
            bias=config.bias,
            sequence_parallel=ctx.sequence_parallel,
            init_method=normal_init(config.init_std),
            partition=qkv_partition(config),
            weight_fn=weight_fn,
            **kw,
        )
        out_init = (
            scaled_normal_init(config.init_std, config.num_layers)
            if config.scaled_output_init
            else normal_init(config.init_std)
        )
        self.linear_proj = RowParallelLinear(
            np_ * hn,
            config.hidden_size,
            tp_group=ctx.tp_group,
            bias=config.bias,
            sequence_parallel=ctx.sequence_parallel,
            init_method=out_init,
            **kw,
        )
        self.rotary = None
        if config.position_embedding == "rope":
            self.rotary = RotaryEmbedding(hn, config.rope_theta)
        # selective activation recomputation (train.activation_checkpointing=selective): the
        # core attention (scores, softmax, dropout, context: the s^2 terms) is recomputed in
        # backward instead of kept; set by the trainer
        self.recompute_core = False
        # fp32 constants kept off the module's buffers, so casting the model leaves them exact.
        self._slopes: dict[torch.device, torch.Tensor] = {}
        if config.position_embedding == "alibi":
            first = ctx.tp_rank * self.np_l
            self._slopes[torch.device("cpu")] = alibi_slopes(np_)[first : first + self.np_l]

    def local_alibi_slopes(self, device: torch.device) -> torch.Tensor | None:
        """This rank's ALiBi slopes [np_l] fp32 on `device`, or None without ALiBi."""
        if not self._slopes:
            return None
        if device not in self._slopes:
            self._slopes[device] = self._slopes[torch.device("cpu")].to(device)
        return self._slopes[device]

    def forward(
        self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden [s(/tp), b, h]; padding_mask bool [b, 1, 1, s], True = masked key, or None.
        Core attention by `config.attention_backend` (megatron_ext.models.core_attention)."""
        cfg, fused = self.config, self.config.fused_ops
        hn = cfg.head_dim
        qkv = self.linear_qkv(hidden)  # [s, b, nkv_l * (g_l + 2) * hn]
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.nkv_l, self.g_l + 2, hn)
        q = qkv[:, :, :, : self.g_l].reshape(s, b, self.np_l, hn)
        k, v = qkv[:, :, :, self.g_l], qkv[:, :, :, self.g_l + 1]  # [s, b, nkv_l, hn]
        if self.rotary is not None:
            cos, sin = self.rotary(s, q.device)
            q = ops.apply_rotary(q, cos, sin, use_fused=fused)
            k = ops.apply_rotary(k, cos, sin, use_fused=fused)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hn]
        dropout = cfg.attention_dropout if self.training else 0.0

        def core(q, k, v):
            return core_attention(
                q,
                k,
                v,
                backend=resolve_backend(
                    cfg.attention_backend, q.device, cfg.position_embedding, cfg.attention_dropout
                ),
                alibi_slopes=self.local_alibi_slopes(q.device),
                padding_mask=padding_mask,
                dropout_p=dropout,
                dropout_rng=self.ctx.rng.fork,  # heads differ per TP rank: independent masks
                use_fused=fused,
            )  # [b, np_l, s, hn]

        if self.recompute_core and torch.is_grad_enabled():
            context = recompute_with_tracker(self.ctx.rng)(core, q, k, v)
        else:
            context = core(q, k, v)
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.np_l * hn)
        return self.linear_proj(context)
