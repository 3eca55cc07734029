"""Per-device memory of a training layout: weights, gradients, optimizer states, activations.

Symbols: s = sequence length, b = micro-batch size, h = hidden size, a = attention heads,
f = FFN hidden size, V = padded vocabulary, L = layers, t = tp, p = pp, d = dp,
m = micro-batches per step (global batch / (b d)).

What is counted, for the most loaded pipeline stage (bytes per parameter P of the device, for
the DeepSpeed ZeRO-1 optimizer the trainer uses, `deepspeed/runtime/zero/stage_1_and_2.py`):
- weights: the stage's parameters / t (norms and row-parallel biases replicated), `param_bytes`;
- gradients, `grad_bytes`: each parameter's `.grad` (param dtype) plus ZeRO-1's contiguous
  gradient bucket, which stages every gradient in fp32 from the first backward to the step
  (4 bytes): 8 under fp32, 6 under bf16/fp16 (Megatron's fp32 main_grad beside the 16-bit grad
  costs the same);
- optimizer under ZeRO-1, over d: the fp32 master partition (DeepSpeed clones it even when the
  parameters are fp32), Adam's two fp32 moments, and the flat fp32 gradient partition the step
  builds (`flatten_dense_tensors_aligned(...).to(fp32)`) and keeps while Adam runs: 16 bytes;
- activations per layer and micro-batch (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", without dropout since our models have none): s b h (8 + 24/t) bytes at 16 bit
  for a GeLU MLP with f = 4h (x2 at fp32), plus a s^2 b / t elements for the attention
  probabilities when they are materialised (ALiBi through a fused softmax does; flash attention
  does not). With full recompute only each layer's input (s b h) is kept, plus one layer's
  activations while it is recomputed; with selective recompute (the attention core only,
  Korthikanti's "selective activation recomputation") the attention probabilities are not kept. Under 1F1B, stage i holds min(p - i, m) micro-batches;
- the logits of the last stage (s b V / t, plus an fp32 copy and its gradient for the loss);
- pipeline buffers: the activation and gradient tensors sent and received between stages.
All terms are summed although the step's buffers exist when the activations are already freed:
ZeRO-1's fp32 bucket outlives the step (it is replaced at the next backward), which is about
what the sum over-counts. Measured against `megatron-ext train` on CPU (peak resident set growth,
validate.py; table in benchmarks/results/planner.md): within 20%.
- runtime: a fixed per-process cost the caller passes. On CPU (`CPU_RUNTIME_BYTES`, 96 MiB) it is
  what building the DeepSpeed engine adds beyond the model's tensors (oneDNN/OpenMP scratch,
  gloo buffers, DeepSpeed's bookkeeping): measured as the resident-set growth after
  `build_engine` minus weights, master copy and Adam states on a 3.3M-parameter model (~100 MiB).
  It is one measured constant, not derived from first principles. GPUs pass 0 (the CUDA/HIP
  context lives in `memory_fraction`'s margin).
Not counted: allocator caching and fragmentation, communication buffers, the CUDA/HIP context;
the planner keeps a margin for them (`memory_fraction`). On CPU glibc's malloc keeps freed blocks
under 32 MiB in its heap, which adds 60-80% to the resident set of a default run: validate.py
measures with a fixed mmap threshold (freed tensors go back to the OS), the CPU counterpart of
`torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from megatron_ext.models.config import ModelConfig

Recompute = Literal["none", "selective", "full"]
GiB = 1024**3
CPU_RUNTIME_BYTES = 96 * 2**20  # see "runtime" in the module docstring


@dataclass(frozen=True)
class Precision:
    name: str
    param_bytes: int
    grad_bytes: int  # .grad + ZeRO-1's fp32 gradient bucket
    master_bytes: int  # fp32 master partition (DeepSpeed keeps one at fp32 too)
    optim_bytes: int  # Adam's exp_avg + exp_avg_sq
    step_bytes: int  # flat fp32 gradient partition built for the optimizer step
    act_bytes: int


PRECISIONS = {
    name: Precision(
        name,
        param_bytes=p,
        grad_bytes=p + 4,
        master_bytes=4,
        optim_bytes=8,
        step_bytes=4,
        act_bytes=p,
    )  # fmt: skip
    for name, p in (("bf16", 2), ("fp16", 2), ("fp32", 4))
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
    runtime: int = 0  # fixed per-process cost given by the caller (CPU_RUNTIME_BYTES on CPU)
    activations_selective_recompute: int = 0

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.pipeline_buffers
            + self.runtime
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
    runtime_bytes: int = 0,
) -> list[MemoryEstimate]:
    """Memory of one device of every pipeline stage (see the module docstring for the model)."""
    prec = PRECISIONS[precision]
    s, b, h = seq_length, layout.micro_batch_size, model.hidden_size
    m = max(1, global_batch_size // (b * layout.dp))
    per_layer = layer_activation_bytes(model, s, layout, prec.act_bytes, attention_scores)
    per_layer_selective = layer_activation_bytes(model, s, layout, prec.act_bytes, False)
    sp = layout.tp if layout.sequence_parallel else 1
    layer_input = s * b * h * prec.act_bytes // sp
    vocab = model.padded_vocab_size(layout.tp) // layout.tp
    out = []
    for stage, n_layers in enumerate(stage_layers(model.num_layers, layout.pp)):
        params = stage_params(model, layout, stage)
        in_flight = min(layout.pp - stage, m)
        act_none = in_flight * n_layers * per_layer
        act_full = in_flight * n_layers * layer_input + (per_layer if n_layers else 0)
        act_sel = in_flight * n_layers * per_layer_selective
        if stage == 0:  # embedding output (and its norm's input)
            extra = in_flight * s * b * h * prec.act_bytes * (2 if model.embedding_layernorm else 1)
            act_none, act_full, act_sel = act_none + extra, act_full + extra, act_sel + extra
        logits = s * b * vocab * (prec.act_bytes + 8) if stage == layout.pp - 1 else 0
        buffers = 4 * s * b * h * prec.act_bytes // sp if layout.pp > 1 else 0
        est = MemoryEstimate(
            stage=stage,
            params=params,
            weights=params * prec.param_bytes,
            gradients=params * prec.grad_bytes,
            optimizer=math.ceil(
                params * (prec.master_bytes + prec.optim_bytes + prec.step_bytes) / layout.dp
            ),
            activations={"full": act_full, "selective": act_sel}.get(layout.recompute, act_none),
            activations_no_recompute=act_none,
            activations_full_recompute=act_full,
            activations_selective_recompute=act_sel,
            logits=logits,
            pipeline_buffers=buffers,
            runtime=runtime_bytes,
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
    runtime_bytes: int = 0,
) -> MemoryEstimate:
    """Memory of one device of the most loaded pipeline stage."""
    stages = estimate_stages(
        model, layout, seq_length, global_batch_size, precision, attention_scores, runtime_bytes
    )
    return max(stages, key=lambda e: e.total)


def total_params(model: ModelConfig) -> int:
    """All parameters of the model (tp = pp = 1), tied embeddings counted once."""
    return stage_params(model, Layout(1, 1, 1, 1), 0)
