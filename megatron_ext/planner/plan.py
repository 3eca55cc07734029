"""Propose (tp, pp, dp, micro-batch, activation recompute) layouts that fit a cluster's memory.

Every combination is tried: tp dividing the devices of a node (tensor parallelism stays inside a
node, where the links are fast) and the attention heads, pp up to the number of layers, dp what
is left of the world, micro-batch from `micro_batch_sizes`, recompute none/full (the trainer's
`train.activation_checkpointing`). A layout is refused with its reason (does not divide, batch
not divisible, does not fit). With a device (`PlanRequest.device`, a profile's default or
`plan --device`) the accepted ones are ranked by the predicted tokens/s of
`megatron_ext.planner.throughput` (step time, TFLOPs, MFU, time shares per layout); without one
(a CPU profile) by a rough relative step time:

    time ~ (4/3 if full recompute) x (1 + (pp - 1) / m)   pipeline bubble, m micro-batches
           x (1 + 0.03 (tp - 1))                           tensor-parallel all-reduces
           x (1 + 0.15 / micro_batch)                      small matmuls run below peak

(data-parallel gradient all-reduce is taken as overlapped), a heuristic to order the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ext.errors import UserError
from megatron_ext.models.config import ModelConfig
from megatron_ext.planner.devices import Device, Links
from megatron_ext.planner.memory import GiB, Layout, MemoryEstimate, estimate_memory
from megatron_ext.planner.throughput import Prediction, predict

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class PlanRequest:
    model: ModelConfig
    nodes: int
    devices_per_node: int
    device_memory_gb: float  # GiB, as vendors list it (A100 "80GB" = 80 GiB)
    seq_length: int
    global_batch_size: int
    precision: str = "bf16"
    memory_fraction: float = 0.9  # the rest: allocator, communication buffers, runtime context
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    attention_scores: bool = True  # attention probabilities stored (no flash attention)
    sequence_parallel: bool = False
    device: Device | None = None  # predicts throughput (planner/throughput.py) when given
    links: Links | None = None
    recompute_modes: tuple[str, ...] = RECOMPUTE
    layouts: tuple[tuple[int, int], ...] | None = None  # only these (tp, pp)

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def budget_bytes(self) -> int:
        return int(self.device_memory_gb * self.memory_fraction * GiB)


@dataclass
class Candidate:
    layout: Layout
    estimate: MemoryEstimate | None = None
    fits: bool = False
    relative_time: float = float("inf")
    reasons: list[str] = field(default_factory=list)
    prediction: Prediction | None = None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def relative_time(layout: Layout, num_microbatches: int) -> float:
    t = 4 / 3 if layout.recompute == "full" else 1.0
    t *= 1 + (layout.pp - 1) / num_microbatches
    t *= 1 + 0.03 * (layout.tp - 1)
    t *= 1 + 0.15 / layout.micro_batch_size
    return t


def _structural_reason(req: PlanRequest, tp: int, pp: int) -> str | None:
    m = req.model
    if m.num_attention_heads % tp:
        return f"tp={tp} does not divide {m.num_attention_heads} attention heads"
    if m.num_kv_heads % tp and tp % m.num_kv_heads:
        return f"tp={tp} and {m.num_kv_heads} kv heads: neither divides the other"
    if m.ffn_hidden_size % tp:
        return f"tp={tp} does not divide ffn_hidden_size {m.ffn_hidden_size}"
    if pp > m.num_layers:
        return f"pp={pp} exceeds {m.num_layers} layers"
    return None


def evaluate(req: PlanRequest, layout: Layout) -> Candidate:
    c = Candidate(layout)
    if req.global_batch_size % (layout.micro_batch_size * layout.dp):
        c.reasons.append(
            f"global batch {req.global_batch_size} not divisible by micro-batch x dp = "
            f"{layout.micro_batch_size} x {layout.dp}"
        )
        return c
    m = req.global_batch_size // (layout.micro_batch_size * layout.dp)
    est = estimate_memory(
        req.model, layout, req.seq_length, req.global_batch_size, req.precision,
        req.attention_scores,
    )  # fmt: skip
    c.estimate = est
    c.fits = est.total <= req.budget_bytes
    budget = req.budget_bytes / GiB
    if not c.fits:
        c.reasons.append(f"needs {est.total / GiB:.1f} GiB > budget {budget:.1f} GiB")
        return c
    c.relative_time = relative_time(layout, m)
    if req.device is not None and req.links is not None:
        c.prediction = predict(
            req.model, layout, req.seq_length, req.global_batch_size, req.device, req.links,
            req.devices_per_node, req.attention_scores, req.precision,
        )  # fmt: skip
        c.relative_time = c.prediction.step_time_s
    c.reasons.append(f"fits: {est.total / GiB:.1f} of {budget:.1f} GiB (stage {est.stage})")
    if layout.recompute == "selective":
        c.reasons.append(
            f"selective recompute: activations {est.activations_no_recompute / GiB:.1f} -> "
            f"{est.activations_selective_recompute / GiB:.1f} GiB, the attention core twice"
        )
    if layout.recompute == "full":
        c.reasons.append(
            f"full recompute: activations {est.activations_no_recompute / GiB:.1f} -> "
            f"{est.activations_full_recompute / GiB:.1f} GiB for ~33% more compute"
        )
    if layout.pp > 1:
        c.reasons.append(f"{m} micro-batches per step: pipeline bubble {(layout.pp - 1) / m:.0%}")
    return c


def plan(req: PlanRequest) -> list[Candidate]:
    """All layouts considered, accepted ones first (fastest first), then the refused."""
    if req.nodes < 1 or req.devices_per_node < 1:
        raise UserError("plan needs --nodes >= 1 and a profile with at least one device per node")
    out: list[Candidate] = []
    world = req.world_size
    for tp in divisors(req.devices_per_node):
        for pp in divisors(world // tp):
            if req.layouts is not None and (tp, pp) not in req.layouts:
                continue
            dp = world // (tp * pp)
            reason = _structural_reason(req, tp, pp)
            for mbs in req.micro_batch_sizes:
                for rc in req.recompute_modes:
                    layout = Layout(tp, pp, dp, mbs, rc, req.sequence_parallel)
                    if reason:
                        out.append(Candidate(layout, reasons=[reason]))
                    else:
                        out.append(evaluate(req, layout))
    out.sort(key=lambda c: (not c.fits, c.relative_time, c.layout.tp * c.layout.pp))
    return out


def accepted(candidates: list[Candidate]) -> list[Candidate]:
    """Fitting layouts, without those that recompute where the same layout fits with less
    recomputation (none < selective < full)."""
    cost = {"none": 0, "selective": 1, "full": 2}
    least: dict[tuple[int, int, int], int] = {}
    for c in candidates:
        if c.fits:
            key = (c.layout.tp, c.layout.pp, c.layout.micro_batch_size)
            least[key] = min(least.get(key, 9), cost.get(c.layout.recompute, 2))
    return [
        c for c in candidates
        if c.fits and cost.get(c.layout.recompute, 2)
        == least[(c.layout.tp, c.layout.pp, c.layout.micro_batch_size)]
    ]  # fmt: skip
