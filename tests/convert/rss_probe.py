"""Peak-memory probe for conversion, run in a fresh process so the figure is its own.

    python -m tests.convert.rss_probe make DIR SIZE_GB   synthetic Llama HF checkpoint (fp32)
    python -m tests.convert.rss_probe from-hf HF OUT TP  HF -> our pipeline checkpoint
    python -m tests.convert.rss_probe to-hf CKPT OUT     our pipeline checkpoint -> HF
The last line printed is JSON: baseline RSS after imports, peak RSS (ru_maxrss), largest
tensor of the checkpoint, seconds.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import psutil

from megatron_ext.convert import driver
from megatron_ext.convert.safetensors_io import (
    HFCheckpoint,
)
from megatron_ext.convert.synthetic import write_synthetic_hf
from megatron_ext.models import ModelConfig


def synthetic_config(size_gb: float) -> ModelConfig:
    """Llama shapes (GQA) with about size_gb GB of fp32 weights; the embedding is largest."""
    per_layer = 45.2e6 * 4  # hidden 2048, ffn 5632, kv 4 of 16 heads
    layers = max(1, round((size_gb * 1e9 - 2 * 32000 * 2048 * 4) / per_layer))
    return ModelConfig(
        family="llama", num_layers=layers, hidden_size=2048, num_attention_heads=16,
        num_kv_heads=4, ffn_hidden_size=5632, vocab_size=32000, seq_length=128,
        position_embedding="rope", norm="rmsnorm", embedding_layernorm=False,
        activation="swiglu", tied_embeddings=False, bias=False,
    )  # fmt: skip


def make(out: Path, size_gb: float) -> None:
    write_synthetic_hf(out, synthetic_config(size_gb))


def main(argv: list[str]) -> None:
    mode, start = argv[0], time.perf_counter()
    baseline = psutil.Process().memory_info().rss
    if mode == "make":
        make(Path(argv[1]), float(argv[2]))
        return
    if mode == "from-hf":
        driver.hf_to_pipeline_checkpoint(argv[1], argv[2], int(argv[3]))
        largest = max(s.nbytes for s in HFCheckpoint(argv[1]).specs().values())
    else:
        out = driver.pipeline_checkpoint_to_hf(argv[1], argv[2])
        largest = max(s.nbytes for s in HFCheckpoint(out).specs().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "baseline_rss": baseline,
        "peak_rss": peak,
        "largest_tensor": largest,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
