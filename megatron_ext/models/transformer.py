"""Building blocks of the decoder-only LM, composed from the config (no family subclasses).

Shape legend
    b  micro-batch size     s  sequence length      h  hidden size     f  FFN size
    V  padded vocabulary    tp tensor-parallel size
    Between stages the hidden state is [s, b, h], or [s/tp, b, h] with sequence parallelism
    (norms, dropout and residual adds then run on this rank's part of the sequence).

The pipeline cuts the model between these stage modules:
    EmbeddingStage   ids [b, s]        -> hidden [s(/tp), b, h]
    TransformerBlock hidden            -> hidden
    HeadStage        hidden            -> logits [b, s, V/tp] (vocab-parallel, padding included)
With tied embeddings the head multiplies by the EmbeddingStage's word embeddings
(`EmbeddingStage.logits`). A pipeline that puts the head on another stage keeps a copy of the
embedding stage there and lets DeepSpeed tie the two, e.g.
    [TiedLayerSpec("embed", EmbeddingStage, config, ctx), LayerSpec(TransformerBlock, ...) x L,
     LayerSpec(Norm, config), TiedLayerSpec("embed", EmbeddingStage, config, ctx,
                                            forward_fn=EmbeddingStage.logits)]
(no forward_fn on the first use, so DeepSpeed saves the tied weight).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext import ops
from megatron_ext.models.attention import SelfAttention
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.partition import glu_partition
from megatron_ext.parallel.context import ParallelContext
from megatron_ext.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_linear,
    normal_init,
    scaled_normal_init,
)
from megatron_ext.parallel.tensor_parallel.layers import TiledNormal, make_param


class Norm(nn.Module):
    """LayerNorm or RMSNorm over the last dimension; parameters are TP-duplicated."""

    def __init__(self, config: ModelConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.kind, self.eps, self.fused = config.norm, config.layernorm_epsilon, config.fused_ops
        h = config.hidden_size
        self.weight = make_param((h,), nn.init.ones_, device=device, dtype=dtype)
        self.weight.tp_duplicated = True
        self.bias = None
        if self.kind == "layernorm":
            self.bias = make_param((h,), nn.init.zeros_, device=device, dtype=dtype)
            self.bias.tp_duplicated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return ops.layer_norm(x, self.weight, self.bias, self.eps, use_fused=self.fused)
        return ops.rms_norm(x, self.weight, self.eps, use_fused=self.fused)


def _dropout(x: torch.Tensor, p: float, training: bool, ctx: ParallelContext) -> torch.Tensor:
    """Dropout on the residual stream: same mask on all TP ranks, or per-rank under SP."""
    if not training or p == 0.0:
        return x
    if ctx.sequence_parallel:
        with ctx.rng.fork():
            return F.dropout(x, p, training=True)
    return F.dropout(x, p, training=True)


def _output_init(config: ModelConfig):
    if config.scaled_output_init:
        return scaled_normal_init(config.init_std, config.num_layers)
    return normal_init(config.init_std)


def _real_rows_init(config: ModelConfig):
    """Normal init of the real vocabulary rows, zeros for the padding rows (TP-invariant)."""
    return TiledNormal(config.init_std, real_rows=config.vocab_size)


class MLP(nn.Module):
    """[s(/tp), b, h] -> [s(/tp), b, h]: fc1 column-parallel (h -> f/tp, or 2f/tp for SwiGLU's
    [gate; up]), activation, fc2 row-parallel (all-reduce, or reduce-scatter with SP)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, *, device=None, dtype=None):
        super().__init__()
        self.activation, self.fused = config.activation, config.fused_ops
        ffn, glu = config.ffn_hidden_size, config.activation == "swiglu"
        kw = {"device": device, "dtype": dtype}
        self.linear_fc1 = ColumnParallelLinear(
            config.hidden_size,
            2 * ffn if glu else ffn,
            tp_group=ctx.tp_group,
            bias=config.bias,
            sequence_parallel=ctx.sequence_parallel,
            skip_bias_add=not glu,  # gelu: bias fused into bias_gelu
            init_method=normal_init(config.init_std),
            partition=glu_partition(ffn) if glu else None,
            **kw,
        )
        self.linear_fc2 = RowParallelLinear(
            ffn,
            config.hidden_size,
            tp_group=ctx.tp_group,
            bias=config.bias,
            sequence_parallel=ctx.sequence_parallel,
            init_method=_output_init(config),
            **kw,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear_fc1(x)
        if self.activation == "swiglu":
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        elif self.linear_fc1.bias is not None:
            y = ops.bias_gelu(y, self.linear_fc1.bias, use_fused=self.fused)
        else:
            y = F.gelu(y, approximate="tanh")
        return self.linear_fc2(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop(attn(norm(x))), then + drop(mlp(norm(.))). [s(/tp), b, h]."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, *, device=None, dtype=None):
        super().__init__()
        self.ctx, self.dropout = ctx, config.hidden_dropout
        kw = {"device": device, "dtype": dtype}
        self.input_norm = Norm(config, **kw)
        self.attention = SelfAttention(config, ctx, **kw)
        self.post_attention_norm = Norm(config, **kw)
        self.mlp = MLP(config, ctx, **kw)

    def forward(
        self, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        attn = self.attention(self.input_norm(hidden), padding_mask)
        hidden = hidden + _dropout(attn, self.dropout, self.training, self.ctx)
        mlp = self.mlp(self.post_attention_norm(hidden))
        return hidden + _dropout(mlp, self.dropout, self.training, self.ctx)


class EmbeddingStage(nn.Module):
    """ids [b, s] -> [s(/tp), b, h]: vocab-parallel lookup (all-reduce, or reduce-scatter with
    SP), + learned positions, embedding LayerNorm, dropout, as the config asks."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, *, device=None, dtype=None):
        super().__init__()
        self.ctx, self.dropout = ctx, config.hidden_dropout
        kw = {"device": device, "dtype": dtype}
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size(ctx.tp_size),
            config.hidden_size,
            tp_group=ctx.tp_group,
            sequence_parallel=ctx.sequence_parallel,
            init_method=normal_init(config.init_std),
            num_real_embeddings=config.vocab_size,
            **kw,
        )
        self.position_embeddings = None
        if config.position_embedding == "learned":
            shape = (config.seq_length, config.hidden_size)
            self.position_embeddings = make_param(shape, normal_init(config.init_std), **kw)
            self.position_embeddings.tp_duplicated = True
        self.norm = Norm(config, **kw) if config.embedding_layernorm else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids.t())  # [s(/tp), b, h]
        if self.position_embeddings is not None:
            s_local = hidden.shape[0]
            first = self.ctx.tp_rank * s_local if self.ctx.sequence_parallel else 0
            hidden = hidden + self.position_embeddings[first : first + s_local].unsqueeze(1)
        if self.norm is not None:
            hidden = self.norm(hidden)
        return _dropout(hidden, self.dropout, self.training, self.ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output projection: [s(/tp), b, h] -> [b, s, V/tp] (no final norm here)."""
        out = column_parallel_linear(
            hidden, self.word_embeddings.weight, None, self.ctx.tp_group, self.ctx.sequence_parallel
        )
        return out.transpose(0, 1)


class HeadStage(nn.Module):
    """Final norm + output projection: [s(/tp), b, h] -> logits [b, s, V/tp].

    With tied embeddings pass the EmbeddingStage whose word embeddings to use; it is kept as
    a reference, not a submodule, so the weight is saved once (under the embedding stage).
    """

    def __init__(
        self,
        config: ModelConfig,
        ctx: ParallelContext,
        tied_embedding: EmbeddingStage | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if config.tied_embeddings and tied_embedding is None:
            raise ValueError("HeadStage: tied_embeddings needs the EmbeddingStage to share")
        self.final_norm = Norm(config, device=device, dtype=dtype)
        self._tied = (tied_embedding,) if config.tied_embeddings else None
        self.output_layer = None
        if not config.tied_embeddings:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                config.padded_vocab_size(ctx.tp_size),
                tp_group=ctx.tp_group,
                bias=False,
                sequence_parallel=ctx.sequence_parallel,
                init_method=_real_rows_init(config),
                device=device,
                dtype=dtype,
            )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_norm(hidden)
        if self._tied is not None:
            return self._tied[0].logits(hidden)
        return self.output_layer(hidden).transpose(0, 1)
