"""Start-up builds no full weights (issue 17.6): with checkpoint.load the stage is built on meta
and allocated uninitialised; on a fresh start each rank generates only its own shard. Measured
as the resident-set growth of building rank 0's stage of a 2-rank tp=2 run (torch's fake process
group, as `megatron-ext rehearse` does), in a fresh process, against the full model's size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.training.helpers import ROOT

BUILD = """
import json, resource, sys
import torch
from megatron_ext.training import engine, rehearse, trainer

cfg = rehearse.load_config(sys.argv[1], sys.argv[3:])
with rehearse.fake_rank(0, 2, 2):
    weights_from_checkpoint = trainer._weights_from_checkpoint(cfg, None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _, _, _, module, _, _ = engine.build_stage(
        cfg, cfg.model, device="meta" if weights_from_checkpoint else None
    )
    module.to("cpu")  # what DeepSpeed does with the stage: allocated (uninitialised on meta)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    params = sum(p.numel() for p in module.parameters())
print(json.dumps({"from_checkpoint": weights_from_checkpoint, "grown": grown, "params": params}))
"""

MODEL = ["parallel.tp=2", "model.hidden_size=1024", "model.num_layers=8",
         "model.num_attention_heads=16", "model.vocab_size=50257"]  # fmt: skip


@pytest.mark.parametrize("start", ["checkpoint.load", "fresh"])
def test_start_up_builds_no_full_weights(start, tmp_path):
    from megatron_ext.models.presets import resolve_model_config
    from megatron_ext.planner.memory import total_params

    extra = [f"checkpoint.dir={tmp_path / 'run'}"]
    if start == "checkpoint.load":
        extra.append(f"checkpoint.load={tmp_path / 'elsewhere'}")
    cmd = [sys.executable, "-c", BUILD, str(ROOT / "examples" / "tiny_bloom.yaml"), "-",
           *MODEL, *extra]  # fmt: skip
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    model = resolve_model_config({"preset": "bloom-176b", "num_layers": 8, "hidden_size": 1024,
                                  "num_attention_heads": 16, "ffn_hidden_size": 4096,
                                  "vocab_size": 50257})  # fmt: skip
    full = total_params(model) * 4  # the whole model in fp32: what every rank built before
    assert r["params"] * 4 < 0.6 * full  # rank 0 holds its tp half
    assert r["from_checkpoint"] == (start == "checkpoint.load")
    if start == "checkpoint.load":
        assert r["grown"] < 0.1 * full, r  # allocated, never written: no pages touched
    else:
        # its shard (+ tiles), not the full weights: initialising each full weight and slicing
        # it (MEGATRON_EXT_FULL_INIT=1) grew by 427 MB here, the shard alone is 305 MB
        assert r["grown"] < 1.15 * r["params"] * 4, r
