"""Our model's stages as DeepSpeed pipeline layers, the layer list, and the partition report.

Shape legend: b micro-batch, s sequence, h hidden, V padded vocabulary, tp TP size.
    PipeEmbedding  tokens [b, s] int64 -> hidden [s, b, h]
    PipeBlock      hidden [s, b, h]    -> hidden [s, b, h]
    PipeFinalNorm  hidden              -> hidden (tied models: the head's final norm alone)
    PipeHead       hidden              -> logits [b, s, V/tp] (untied models)
    tied logits    TiedLayerSpec("embed", PipeEmbedding, forward_fn=tied_logits) on the last
                   stage: hidden -> logits through the (DeepSpeed-tied) word embeddings.

Each layer runs its parent's __init__ inside `stage_init_rng(seed, index)` with the index
`build_stage` uses (0 embedding, 1..L blocks, L+1 head), so the weights equal the
non-pipeline `TransformerLM(seed=seed)` at every (tp, pp, dp) layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from deepspeed.pipe import LayerSpec, TiedLayerSpec
from deepspeed.runtime.utils import partition_balanced, partition_uniform

from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.model import build_stage, stage_init_rng
from megatron_ext.models.transformer import EmbeddingStage, HeadStage, Norm, TransformerBlock
from megatron_ext.parallel.context import ParallelContext
from megatron_ext.parallel.tensor_parallel import vocab_parallel_cross_entropy

log = get_logger(__name__)

TIED_KEY = "embed"


class PipeEmbedding(EmbeddingStage):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, seed: int | None, device=None):
        with stage_init_rng(seed, 0):
            super().__init__(config, ctx, device=device)


class PipeBlock(TransformerBlock):
    def __init__(
        self, config: ModelConfig, ctx: ParallelContext, index: int, seed: int | None, device=None
    ):
        with stage_init_rng(seed, index):
            super().__init__(config, ctx, device=device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # no padding mask in pretraining
        return super().forward(hidden, None)


class PipeFinalNorm(Norm):
    def __init__(self, config: ModelConfig, seed: int | None, device=None) -> None:
        with stage_init_rng(seed, config.num_layers + 1):
            super().__init__(config, device=device)


class PipeHead(HeadStage):
    def __init__(self, config: ModelConfig, ctx: ParallelContext, seed: int | None, device=None):
        with stage_init_rng(seed, config.num_layers + 1):
            super().__init__(config, ctx, None, device=device)


def tied_logits(embedding: EmbeddingStage, hidden: torch.Tensor) -> torch.Tensor:
    """forward_fn of the last use of the tied embedding: hidden [s, b, h] -> [b, s, V/tp]."""
    return embedding.logits(hidden)


class LMLoss:
    """Mean per-token cross entropy over the real vocabulary (all-reduces over TP in forward)."""

    def __init__(self, ctx: ParallelContext, vocab_size: int) -> None:
        self.ctx, self.vocab_size = ctx, vocab_size

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_token = vocab_parallel_cross_entropy(
            logits, labels, self.ctx.tp_group, vocab_size=self.vocab_size
        )
        return per_token.mean()


def layer_specs(
    config: ModelConfig, ctx: ParallelContext, seed: int | None, device: str | None = None
) -> list:
    """The pipeline's layer list (see the module docstring). device="meta": parameters are
    allocated (uninitialised) when the module moves to its device, for weights that a
    checkpoint load overwrites (training/engine.py, StagePipeline).

    Tied models: the first use of the tied embedding has no forward_fn, else DeepSpeed never
    saves the tied weight and a resume silently starts from a stale embedding (trap).
    """
    kw = {"device": device}
    blocks = [
        LayerSpec(PipeBlock, config, ctx, i, seed, **kw) for i in range(1, config.num_layers + 1)
    ]
    if not config.tied_embeddings:
        return [
            LayerSpec(PipeEmbedding, config, ctx, seed, **kw),
            *blocks,
            LayerSpec(PipeHead, config, ctx, seed, **kw),
        ]
    tied = {"tied_weight_attr": "word_embeddings.weight", **kw}
    embed = TiedLayerSpec(TIED_KEY, PipeEmbedding, config, ctx, seed, **tied)
    logits = TiedLayerSpec(
        TIED_KEY, PipeEmbedding, config, ctx, seed, forward_fn=tied_logits, **tied
    )
    return [embed, *blocks, LayerSpec(PipeFinalNorm, config, seed, **kw), logits]


def partition_method(name: str) -> str:
    """Our config name -> DeepSpeed's: by parameters, uniform, or by layer type (blocks)."""
    return {"parameters": "parameters", "uniform": "uniform", "type": "type:PipeBlock"}[name]


def layer_names(config: ModelConfig) -> list[str]:
    last = ["final_norm", "tied_logits"] if config.tied_embeddings else ["head"]
    return ["embedding", *[f"block{i}" for i in range(1, config.num_layers + 1)], *last]


def _per_rank(module: torch.nn.Module, tp_size: int) -> int:
    return sum(
        p.numel() // tp_size if getattr(p, "tensor_parallel", False) else p.numel()
        for p in module.parameters()
    )


def layer_param_counts(config: ModelConfig, tp_size: int = 1) -> list[int]:
    """Parameters per pipeline layer on one TP rank (meta build, TP-split weights divided).

    The tied logits layer counts the embedding again, as DeepSpeed's "parameters" balancing does.
    """
    ctx = ParallelContext.single()
    emb = _per_rank(build_stage(config, ctx, 0, device="meta"), tp_size)
    emb += (
        (config.padded_vocab_size(tp_size) - config.padded_vocab_size(1))
        * config.hidden_size
        // tp_size
    )
    block = _per_rank(build_stage(config, ctx, 1, device="meta"), tp_size)
    norm = 2 * config.hidden_size if config.norm == "layernorm" else config.hidden_size
    counts = [emb, *[block] * config.num_layers]
    if config.tied_embeddings:
        return [*counts, norm, emb]
    return [*counts, norm + config.padded_vocab_size(tp_size) * config.hidden_size // tp_size]


@dataclass
class PartitionReport:
    parts: list[int]  # layer boundaries, DeepSpeed's `parts`
    names: list[str]
    params: list[int]  # per stage, one TP rank

    def format(self) -> str:
        lines = []
        for stage in range(len(self.parts) - 1):
            lo, hi = self.parts[stage], self.parts[stage + 1]
            lines.append(
                f"stage {stage}: layers {lo}..{hi - 1} ({', '.join(self.names[lo:hi])}), "
                f"{self.params[stage]:,} parameters per TP rank"
            )
        return "\n".join(lines)


def partition_report(
    config: ModelConfig, pp_size: int, tp_size: int, method: str
) -> PartitionReport:
    """The stage cut DeepSpeed makes for `method`, computed without building the model."""
    counts = layer_param_counts(config, tp_size)
    names = layer_names(config)
    if method == "parameters":
        parts = partition_balanced(counts, pp_size)
    elif method == "uniform":
        parts = partition_uniform(len(counts), pp_size)
    else:
        parts = partition_balanced([int(n.startswith("block")) for n in names], pp_size)
    params = [sum(counts[parts[i] : parts[i + 1]]) for i in range(pp_size)]
    return PartitionReport(list(parts), names, params)
