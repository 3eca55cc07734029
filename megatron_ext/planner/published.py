"""Published training runs the throughput model is checked against (tests/planner/
test_throughput.py, benchmarks/planner_published.py). TFLOPs are per device and count
recompute, as their stacks report them (Megatron-DeepSpeed's 24 k B s l h^2 (1 + s/6h +
V/16lh) with k = 4 under activation checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.presets import resolve_model_config


@dataclass(frozen=True)
class PublishedRun:
    name: str
    model: str | tuple[int, int, int]  # a preset, or (layers, hidden, heads) of a TurkuNLP model
    layout: tuple[int, int, int, int]  # tp, pp, dp, micro-batch
    global_batch: int
    device: str
    links: str
    tflops: float  # hardware TFLOPs per device, as published
    source: str

    def model_config(self) -> ModelConfig:
        if isinstance(self.model, str):
            return resolve_model_config(self.model)
        layers, hidden, heads = self.model
        # BLOOM architecture (ALiBi, embedding LayerNorm, GeLU 4h, tied embeddings), GPT-2 BPE
        # vocabulary (50,257, padded to 51,200)
        return resolve_model_config({
            "preset": "bloom-176b", "num_layers": layers, "hidden_size": hidden,
            "num_attention_heads": heads, "ffn_hidden_size": 4 * hidden, "vocab_size": 50257,
        })  # fmt: skip


BLOOM = ("bigscience-workshop/bigscience train/tr11-176B-ml: chronicles.md (GBS 2048: 149-150 "
         "TFLOPs per GPU) and README.md (GBS 192 at micro-batch 1: 73; GBS 16 at micro-batch 2: "
         "15.23 s per iteration, 8.04); 48 nodes x 8 A100-80GB, seq 2048, full recompute")  # fmt: skip
LUMI = ("spyysalo/lumi-llm-scaling (commit 7314958) meg-ds/README.md means and "
        "meg-ds/pretrain_*_node.sh: MI250X GCDs, micro-batch 2, global batch 1024, seq 2048, full "
        "recompute, bf16 (shared/notes/field-facts.md quotes an earlier version of the README: "
        "71.9 / 67.6 / 65.0, within 3%)")  # fmt: skip

RUNS = [
    PublishedRun("BLOOM-176B, GBS 2048", "bloom-176b", (4, 12, 8, 2), 2048, "a100-80gb",
                 "jean-zay", 150.0, BLOOM),
    PublishedRun("BLOOM-176B, GBS 192 (ramp-up)", "bloom-176b", (4, 12, 8, 1), 192, "a100-80gb",
                 "jean-zay", 73.0, BLOOM),
    PublishedRun("BLOOM-176B, GBS 16 (ramp-up)", "bloom-176b", (4, 12, 8, 2), 16, "a100-80gb",
                 "jean-zay", 8.04, BLOOM),
    PublishedRun("33B on 8 LUMI nodes", (60, 6656, 52), (2, 4, 8, 2), 1024, "mi250x-gcd", "lumi",
                 72.3, LUMI),
    PublishedRun("65B on 8 LUMI nodes", (80, 8192, 64), (2, 8, 4, 2), 1024, "mi250x-gcd", "lumi",
                 69.3, LUMI),
    PublishedRun("175B on 16 LUMI nodes", (70, 14336, 112), (8, 8, 2, 2), 1024, "mi250x-gcd",
                 "lumi", 67.0, LUMI),
]  # fmt: skip


def predicted(run: PublishedRun, recompute: str = "full"):
    from megatron_ext.planner.devices import DEVICES, LINKS
    from megatron_ext.planner.memory import Layout
    from megatron_ext.planner.throughput import predict

    tp, pp, dp, mbs = run.layout
    return predict(run.model_config(), Layout(tp, pp, dp, mbs, recompute), 2048, run.global_batch,
                   DEVICES[run.device], LINKS[run.links], 8)  # fmt: skip
