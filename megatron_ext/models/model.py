"""TransformerLM: the stage modules in order, a plain sequential forward, and the LM loss.

Shape legend: b batch, s sequence, h hidden, V padded vocabulary, tp TP size.
    input_ids [b, s] int64 -> logits [b, s, V/tp] (vocab-parallel) or, with labels, the
    per-token loss [b, s] fp32 (padding columns excluded).

Initialisation is independent of the parallel layout: with `seed` given, stage i (0 =
embedding, 1..L = blocks, L+1 = head) is initialised from its own generator state
(seed, i), each weight in full before the TP split, so TP=1/2/4 and any pipeline cut start
from the same weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.transformer import EmbeddingStage, HeadStage, TransformerBlock
from megatron_ext.parallel.context import ParallelContext
from megatron_ext.parallel.tensor_parallel import vocab_parallel_cross_entropy


@contextlib.contextmanager
def stage_init_rng(seed: int | None, stage_index: int) -> Iterator[None]:
    """Seed the CPU generator for stage `stage_index` (restored afterwards); None: no-op."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((seed * 100_003 + stage_index) % 2**63)
        yield


def build_stage(
    config: ModelConfig,
    ctx: ParallelContext,
    index: int,
    *,
    seed: int | None = None,
    tied_embedding: EmbeddingStage | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Stage `index` alone (for a pipeline stage): 0 embedding, 1..L blocks, L+1 head."""
    last = config.num_layers + 1
    if not 0 <= index <= last:
        raise ValueError(f"stage index {index} outside 0..{last}")
    kw = {"device": device, "dtype": dtype}
    with stage_init_rng(seed, index):
        if index == 0:
            return EmbeddingStage(config, ctx, **kw)
        if index == last:
            return HeadStage(config, ctx, tied_embedding, **kw)
        return TransformerBlock(config, ctx, **kw)


class TransformerLM(nn.Module):
    """embedding -> num_layers blocks -> head, each a stage module (see `stages`)."""

    def __init__(
        self,
        config: ModelConfig,
        ctx: ParallelContext,
        *,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        config.check_tp(ctx.tp_size)
        self.config, self.ctx = config, ctx
        kw = {"seed": seed, "device": device, "dtype": dtype}
        self.embedding = build_stage(config, ctx, 0, **kw)
        self.layers = nn.ModuleList(
            build_stage(config, ctx, i + 1, **kw) for i in range(config.num_layers)
        )
        tied = self.embedding if config.tied_embeddings else None
        self.head = build_stage(config, ctx, config.num_layers + 1, tied_embedding=tied, **kw)

    @property
    def stages(self) -> list[nn.Module]:
        """[EmbeddingStage, TransformerBlock x num_layers, HeadStage], in forward order."""
        return [self.embedding, *self.layers, self.head]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [b, s] -> logits [b, s, V/tp], or per-token loss [b, s] with labels.

        attention_mask [b, s] (1 = real token, 0 = padding) masks padded keys; positions
        still count from 0 at the first column (right padding is the supported case).
        """
        padding_mask = None
        if attention_mask is not None:
            padding_mask = (attention_mask == 0)[:, None, None, :]
        hidden = self.embedding(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, padding_mask)
        logits = self.head(hidden)
        return logits if labels is None else self.loss(logits, labels)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Per-token cross entropy [b, s] fp32 over the real vocabulary (all-reduces over TP)."""
        return vocab_parallel_cross_entropy(
            logits,
            labels,
            self.ctx.tp_group,
            label_smoothing=label_smoothing,
            vocab_size=self.config.vocab_size,
        )


def build_model(
    config: ModelConfig,
    ctx: ParallelContext | None = None,
    *,
    seed: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TransformerLM:
    """The whole model on this TP rank (ctx None: one process). device="meta" allocates nothing."""
    return TransformerLM(
        config, ctx or ParallelContext.single(), seed=seed, device=device, dtype=dtype
    )


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(config: ModelConfig, tp_size: int = 1) -> dict:
    """Parameter counts of the full model (summed over TP ranks), measured on a meta build.

    num_parameters excludes vocabulary padding; num_parameters_padded has the vocabulary
    padded for `tp_size`. parts: per-component counts (unpadded); per_layer: one block.
    """
    model = build_model(config, device="meta")
    emb, block, head = model.embedding, model.layers[0], model.head
    h, vocab_mats = config.hidden_size, 1 if config.tied_embeddings else 2
    pad_tp1 = config.padded_vocab_size(1) - config.vocab_size
    pad_tp = config.padded_vocab_size(tp_size) - config.vocab_size
    total_tp1 = _numel(model)
    unpadded = total_tp1 - pad_tp1 * h * vocab_mats
    word = emb.word_embeddings.weight.numel() - pad_tp1 * h
    output = 0 if head.output_layer is None else head.output_layer.weight.numel() - pad_tp1 * h
    positions = 0 if emb.position_embeddings is None else emb.position_embeddings.numel()
    parts = {
        "word_embeddings": word,
        "position_embeddings": positions,
        "embedding_norm": _numel(emb.norm),
        "layers": _numel(model.layers),
        "final_norm": _numel(head.final_norm),
        "output_layer": output,
    }
    per_layer = {
        "attention": _numel(block.attention),
        "mlp": _numel(block.mlp),
        "norms": _numel(block.input_norm) + _numel(block.post_attention_norm),
        "total": _numel(block),
    }
    assert sum(parts.values()) == unpadded, (parts, unpadded)
    return {
        "num_parameters": unpadded,
        "num_parameters_padded": unpadded + pad_tp * h * vocab_mats,
        "vocab_size": config.vocab_size,
        "padded_vocab_size": config.padded_vocab_size(tp_size),
        "tp_size": tp_size,
        "parts": parts,
        "per_layer": per_layer,
    }
