"""Predicted step time and throughput of a training layout (issue 18).

Per layout (tp, pp, dp, micro-batch b, recompute) with m = global batch / (b dp) micro-batches:

    step = (m + pp - 1) t_stage + t_dp + t_tied + t_optimizer

t_stage, one micro-batch through the slowest stage (forward and backward), sums per device:
- matrix FLOPs (training/flops.py's per-token counts, / tp) at peak x MATMUL_EFFICIENCY[family]
  x shape factor d / (d + SHAPE_D0), d the smallest matrix dimension on the device (tokens of
  the micro-batch, h / tp); backward twice the forward, full recompute one forward more,
  selective the attention core once more;
- memory-bound work (norms, residual adds, GeLU, softmax of materialised scores, cross entropy)
  as bytes over HBM bandwidth;
- tensor-parallel all-reduces (2 per block forward, 2 backward, 2 more with full recompute) of
  b s h bf16 values: 2 (tp - 1) / tp x bytes / link + latency (the fast links inside a
  package/NVSwitch, `planner/devices.py`);
- pipeline send/recv of b s h bf16 values forward and backward across nodes.
t_dp: DeepSpeed's gradient all-reduce and ZeRO-1's all-gather of the updated weights after the
last micro-batch (the pipeline engine does not overlap them): about 2 (dp - 1) / dp x 6 bytes
per parameter of the stage over the inter-node link. t_tied: the tied embedding's gradient all-reduce (first and last
stage). t_optimizer: Adam over the rank's fp32 shard, ~32 bytes per parameter over HBM.

TFLOPs per device: model FLOPs (no recompute) and hardware FLOPs (with it, as Megatron and the
TurkuNLP/BLOOM logs report) per token x tokens per step / step / devices; MFU = model / peak.

Constants, few and named: MATMUL_EFFICIENCY per device family is fitted once to a published run
(A100: BLOOM-176B at global batch 2048; MI250X: TurkuNLP's 65B on 8 LUMI nodes; Hopper: not
fitted, A100's value assumed) and checked against the others (tests/planner/test_throughput.py,
benchmarks/results/planner.md); SHAPE_D0 and the memory-bound byte counts are estimates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_ext.models.config import ModelConfig
from megatron_ext.planner.devices import Device, Links
from megatron_ext.planner.memory import Layout, stage_layers, stage_params
from megatron_ext.training import flops

# fraction of the dense bf16 peak that large transformer matmuls reach, per device family;
# fitted (see the module docstring)
MATMUL_EFFICIENCY = {
    "nvidia-ampere": 0.62,
    "nvidia-hopper": 0.62,
    "amd-cdna2": 0.46,
    "cpu": 1.0,  # its "peak" is a measured 512^3 fp32 matmul (planner/cpu_device.py)
}
SHAPE_D0 = 128  # a matrix dimension of SHAPE_D0 runs at half the large-matrix efficiency
# the share of a device's inter-node bandwidth that ring collectives and pipeline send/recv
# reach across many nodes; fitted to BLOOM-176B's ramp-up steps (global batch 16 and 192, whose
# step times are dominated by the pipeline bubble and the data-parallel reduction)
INTER_NODE_EFFICIENCY = 0.8
ADAM_BYTES_PER_PARAM = 32  # fp32 master, m, v read and written, gradient read, bf16 copy out


@dataclass
class Prediction:
    step_time_s: float
    tokens_per_s: float
    tflops_per_device_model: float
    tflops_per_device_hardware: float
    mfu: float
    bubble: float  # (pp - 1) t_stage / step: the share of the step the pipeline idles
    shares: dict  # compute, memory-bound, TP communication, PP communication, bubble, DP,
    # optimizer: fractions of the step time
    micro_batches: int

    def as_dict(self) -> dict:
        return asdict(self)


def _allreduce_s(nbytes: float, ranks: int, gb_s: float, latency_s: float) -> float:
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / (gb_s * 1e9) + 2 * (ranks - 1) * latency_s


def predict(
    model: ModelConfig,
    layout: Layout,
    seq_length: int,
    global_batch_size: int,
    dev: Device,
    links: Links,
    devices_per_node: int,
    attention_scores: bool = True,
    precision: str = "bf16",
) -> Prediction:
    """The predicted step of LAYOUT (see the module docstring)."""
    act = 4 if precision == "fp32" else 2  # bytes of an activation, weight or sent value
    grad = 4  # fp32 gradients: fp32 runs, and bf16 runs accumulate in fp32 (BF16_Optimizer)
    inter = links.inter_node_gb_s * INTER_NODE_EFFICIENCY
    tp, pp, dp, b = layout.tp, layout.pp, layout.dp, layout.micro_batch_size
    m = max(1, global_batch_size // (b * dp))
    s, h = seq_length, model.hidden_size
    tokens = b * s
    peak = dev.peak_tflops * 1e12
    smallest = min(tokens, h // tp)
    eff = MATMUL_EFFICIENCY[dev.family] * smallest / (smallest + SHAPE_D0)
    block_fwd = flops.block_forward_flops(model, s) * tokens / tp
    core_fwd = flops.attention_core_flops(model, s) * tokens / tp
    passes = {"none": 3.0, "selective": 3.0, "full": 4.0}.get(layout.recompute, 4.0)
    extra_core = core_fwd if layout.recompute == "selective" else 0.0
    heads = model.num_attention_heads // tp
    # memory-bound bytes of one block forward: two norms and two residual adds over h
    # (replicated over tp unless sequence parallel), the activation over f / tp, and the
    # materialised attention scores (written, softmax read + written, read by probs @ v)
    sp = tp if layout.sequence_parallel else 1
    mem_fwd = tokens * act * (8 * h / sp + 2 * model.ffn_hidden_size / tp)
    if attention_scores:
        mem_fwd += b * heads * s * s * act * 4
    mem_passes = passes  # the same pattern as the matrix work (selective: + the scores again)
    if layout.recompute == "selective" and attention_scores:
        mem_passes_extra = b * heads * s * s * act * 4
    else:
        mem_passes_extra = 0.0
    tp_links = links.tp_gb_s if tp <= links.fast_group else links.tp_wide_gb_s
    ar = _allreduce_s(tokens * h * act, tp, tp_links, links.latency_intra_s)
    ar_per_block = (6 if layout.recompute in ("full", "every") else 4) * ar
    crosses = tp * dp >= devices_per_node  # the next stage's ranks are on another node
    p2p_gb_s = inter if crosses else tp_links
    p2p = 2 * (tokens * h * act / (p2p_gb_s * 1e9) + links.latency_inter_s) if pp > 1 else 0.0
    vocab = model.padded_vocab_size(tp)
    times = []
    parts = []
    for stage, n_layers in enumerate(stage_layers(model.num_layers, pp)):
        compute = n_layers * (passes * block_fwd + extra_core) / (peak * eff)
        memory = n_layers * (mem_passes * mem_fwd + mem_passes_extra) / (dev.hbm_gb_s * 1e9)
        if stage == pp - 1:  # logits and cross entropy
            compute += 3 * 2 * h * vocab / tp * tokens / (peak * eff)
            memory += 3 * tokens * vocab / tp * 4 * 3 / (dev.hbm_gb_s * 1e9)
        comm = n_layers * ar_per_block
        total = compute + memory + comm + p2p
        times.append(total)
        parts.append((compute, memory, comm, p2p))
    slowest = max(range(pp), key=lambda i: times[i])
    t_stage = times[slowest]
    params = max(stage_params(model, layout, st) for st in range(pp))
    # DeepSpeed's pipeline engine all-reduces the gradients (buffered_allreduce_fallback, cast
    # to the communication dtype) and ZeRO-1 all-gathers the updated weights, across nodes:
    # (grad + act) / 2 bytes per parameter in all-reduce terms
    t_dp = _allreduce_s(params * (grad + act) / 2, dp, inter, links.latency_inter_s)
    t_tied = 0.0
    if model.tied_embeddings and pp > 1:
        t_tied = _allreduce_s(vocab * h / tp * grad, 2, inter, links.latency_inter_s)
    t_opt = params / dp * ADAM_BYTES_PER_PARAM / (dev.hbm_gb_s * 1e9)
    pipeline = (m + pp - 1) * t_stage
    step = pipeline + t_dp + t_tied + t_opt
    step_tokens = global_batch_size * s
    world = tp * pp * dp
    model_flops = flops.model_flops_per_token(model, s) * step_tokens / step / world / 1e12
    hw = flops.hardware_flops_per_token(model, s, layout.recompute) * step_tokens / step / world
    compute, memory, comm, p2p_s = (x * m for x in parts[slowest])
    bubble_s = (pp - 1) * t_stage
    return Prediction(
        step_time_s=step,
        tokens_per_s=step_tokens / step,
        tflops_per_device_model=model_flops,
        tflops_per_device_hardware=hw / 1e12,
        mfu=model_flops / dev.peak_tflops,
        bubble=bubble_s / step,
        shares={
            "compute": compute / step,
            "memory_bound": memory / step,
            "tp_communication": comm / step,
            "pp_communication": p2p_s / step,
            "bubble": bubble_s / step,
            "dp_communication": (t_dp + t_tied) / step,
            "optimizer": t_opt / step,
        },
        micro_batches=m,
    )
