"""Per-device memory of a training layout: weights, gradients, optimizer states, activations.

Symbols: s = sequence length, b = micro-batch size, h = hidden size, a = attention heads,
f = FFN hidden size, V = padded vocabulary, L = layers, t = tp, p = pp, d = dp,
m = micro-batches per step (global batch / (b d)).

What is counted, for the most loaded pipeline stage:
- weights, gradients: the stage's parameters / t (norms and row-parallel biases replicated),
  at `param_bytes` and `grad_bytes`. Under bf16/fp16, gradients accumulate in fp32 (Megatron's
  main_grad, DeepSpeed's BF16_Optimizer) and the 16-bit `.grad` of the current micro-batch lives
  beside them during backward: 6 bytes per parameter, the conservative choice;
- optimizer states under ZeRO-1: fp32 master weights (mixed precision only) and Adam's two
  moments, sharded over d;
- activations per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", without dropout since our models have none): s b h (8 + 24/t) bytes at 16 bit
  for a GeLU MLP with f = 4h, plus 2 a s^2 b / t for the attention probabilities when they are
  materialised (ALiBi through a fused softmax does; flash attention does not). With full
  recompute only each layer's input (2 s b h) is kept, plus one layer's activations while it is
  recomputed. Under 1F1B, stage i holds min(p - i, m) micro-batches in flight;
- the logits of the last stage (s b V / t, plus an fp32 copy and its gradient for the loss);
- pipeline buffers: the activation and gradient tensors sent and received between stages.
Not counted: allocator fragmentation, communication buckets, the CUDA/HIP context; the planner
keeps a margin for them (`memory_fraction`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from megatron_ext.models.config import ModelConfig

Recompute = Literal["none", "full"]
GiB = 1024**3


@dataclass(frozen=True)
class Precision:
    name: str
    param_bytes: int
    grad_bytes: int
    master_bytes: int  # fp32 master copy kept by the optimizer (0 when params are fp32)
    optim_bytes: int  # Adam's exp_avg + exp_avg_sq
    act_bytes: int


PRECISIONS = {
    "bf16": Precision(
        "bf16", param_bytes=2, grad_bytes=6, master_bytes=4, optim_bytes=8, act_bytes=2
    ),
    "fp16": Precision(
        "fp16", param_bytes=2, grad_bytes=6, master_bytes=4, optim_bytes=8, act_bytes=2
    ),
    "fp32": Precision(
        "fp32", param_bytes=4, grad_bytes=4, master_bytes=0, optim_bytes=8, act_bytes=4
    ),
}


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch_size: int
    recompute: Recompute = "none"
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device of pipeline stage `stage`."""

    stage: int
    params: int  # parameter count on the device
    weights: int
    gradients: int
    optimizer: int
    activations: int  # with the layout's recompute choice
    activations_no_recompute: int
    activations_full_recompute: int
    logits: int
    pipeline_buffers: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.pipeline_buffers
        )

    def as_gib(self) -> dict[str, float]:
        d = {k: v / GiB for k, v in asdict(self).items() if k not in ("stage", "params")}
        d["total"] = self.total / GiB
        return d


def layer_params(model: ModelConfig, tp: int) -> tuple[int, int]:
    """(parameters split over tp, parameters replicated on every tp rank) of one block."""
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_kv_heads * model.head_dim
    mlp_in = 2 * f if model.activation == "swiglu" else f
    split = h * (h + 2 * kv) + h * h + h * mlp_in + f * h
    replicated = (2 if model.norm == "layernorm" else 1) * 2 * h  # two norms
    if model.bias:
        split += (h + 2 * kv) + mlp_in  # column-parallel biases are split
        replicated += 2 * h  # row-parallel biases (attention output, fc2) are not
    return math.ceil(split / tp), replicated


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Blocks per stage, the remainder going to the middle stages (first/last hold embeddings)."""
    base, extra = divmod(num_layers, pp)
    counts = [base] * pp
    order = sorted(range(pp), key=lambda i: (i in (0, pp - 1), i))
    for i in order[:extra]:
        counts[i] += 1
    return counts


def stage_params(model: ModelConfig, layout: Layout, stage: int) -> int:
    tp, pp = layout.tp, layout.pp
    split, replicated = layer_params(model, tp)
    n = stage_layers(model.num_layers, pp)[stage] * (split + replicated)
    h = model.hidden_size
    vocab = model.padded_vocab_size(tp) * h // tp
    norm = (2 if model.norm == "layernorm" else 1) * h
    if stage == 0:
        n += vocab
        if model.position_embedding == "learned":
            n += model.seq_length * h
        if model.embedding_layernorm:
            n += norm
    if stage == pp - 1:
        n += norm  # final norm
        if pp > 1 or not model.tied_embeddings:
            n += vocab  # output layer (a tied copy when pp > 1)
    return n


def layer_activation_bytes(model: ModelConfig, seq: int, layout: Layout, act_bytes: int,
                           attention_scores: bool = True) -> int:  # fmt: skip
    """Activations one block keeps for backward, for one micro-batch, without recompute."""
    s, b, h, t = seq, layout.micro_batch_size, model.hidden_size, layout.tp
    f = model.ffn_hidden_size
    kv = model.num_kv_heads * model.head_dim
    sp = t if layout.sequence_parallel else 1
    # Replicated over tp (split with sequence parallelism): both norm inputs, QKV and fc1 inputs.
    replicated = 4 * s * b * h / sp
    # Split over tp: Q, K, V, attention-output input; MLP activation input(s) and fc2 input.
    mlp = (3 if model.activation == "swiglu" else 1) * f + f
    split = s * b * (h + 2 * kv + h + mlp) / t
    elems = replicated + split
    if attention_scores:
        elems += model.num_attention_heads * s * s * b / t  # softmax output
    return int(elems * act_bytes)


def estimate_stages(
    model: ModelConfig,
    layout: Layout,
    seq_length: int,
    global_batch_size: int,
    precision: str = "bf16",
    attention_scores: bool = True,
) -> list[MemoryEstimate]:
    """Memory of one device of every pipeline stage (see the module docstring for the model)."""
    prec = PRECISIONS[precision]
    s, b, h = seq_length, layout.micro_batch_size, model.hidden_size
    m = max(1, global_batch_size // (b * layout.dp))
    per_layer = layer_activation_bytes(model, s, layout, prec.act_bytes, attention_scores)
    sp = layout.tp if layout.sequence_parallel else 1
    layer_input = s * b * h * prec.act_bytes // sp
    vocab = model.padded_vocab_size(layout.tp) // layout.tp
    out = []
    for stage, n_layers in enumerate(stage_layers(model.num_layers, layout.pp)):
        params = stage_params(model, layout, stage)
        in_flight = min(layout.pp - stage, m)
        act_none = in_flight * n_layers * per_layer
        act_full = in_flight * n_layers * layer_input + (per_layer if n_layers else 0)
        if stage == 0:  # embedding output (and its norm's input)
            extra = in_flight * s * b * h * prec.act_bytes * (2 if model.embedding_layernorm else 1)
            act_none, act_full = act_none + extra, act_full + extra
        logits = s * b * vocab * (prec.act_bytes + 8) if stage == layout.pp - 1 else 0
        buffers = 4 * s * b * h * prec.act_bytes // sp if layout.pp > 1 else 0
        est = MemoryEstimate(
            stage=stage,
            params=params,
            weights=params * prec.param_bytes,
            gradients=params * prec.grad_bytes,
            optimizer=math.ceil(params * (prec.master_bytes + prec.optim_bytes) / layout.dp),
            activations=act_full if layout.recompute == "full" else act_none,
            activations_no_recompute=act_none,
            activations_full_recompute=act_full,
            logits=logits,
            pipeline_buffers=buffers,
        )
        out.append(est)
    return out


def estimate_memory(
    model: ModelConfig,
    layout: Layout,
    seq_length: int,
    global_batch_size: int,
    precision: str = "bf16",
    attention_scores: bool = True,
) -> MemoryEstimate:
    """Memory of one device of the most loaded pipeline stage."""
    stages = estimate_stages(
        model, layout, seq_length, global_batch_size, precision, attention_scores
    )
    return max(stages, key=lambda e: e.total)


def total_params(model: ModelConfig) -> int:
    """All parameters of the model (tp = pp = 1), tied embeddings counted once."""
    return stage_params(model, Layout(1, 1, 1, 1), 0)
