"""`evaluate` evaluates the checkpoint it says (the newest complete one, with that checkpoint's
own config), prints valid JSON, and exits non-zero on a non-finite loss. It used to read
`latest`'s config whatever it loaded, and to print `NaN` (not JSON) with exit 0."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml

from megatron_ext.checkpoint_format import write_manifest
from tests.training.helpers import env, run_train


def _evaluate(ckpt, data):
    cmd = [sys.executable, "-m", "megatron_ext", "evaluate", "--checkpoint", str(ckpt),
           "--data-path", data, "--num-samples", "8", "--json"]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env())


def test_evaluate_names_what_it_loaded_and_refuses_a_nan_loss(fi_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_train("bloom", fi_dataset, ckpt, "train.iterations=4", "checkpoint.interval=2")
    # the newest is half-written and its config no longer matches the weights
    newest = ckpt / "iter_0000004"
    (newest / "manifest.json").unlink()
    config = yaml.safe_load((newest / "config.yaml").read_text())
    config["model"]["hidden_size"] = 96
    (newest / "config.yaml").write_text(yaml.safe_dump(config))
    proc = _evaluate(ckpt, fi_dataset)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (result["tag"], result["iteration"]) == ("iter_0000002", 2)
    assert result["loss"] > 0
    # a NaN in the weights (same file size): valid JSON with null, exit 3
    older = ckpt / "iter_0000002"
    layer = next(older.glob("layer_01-model_00-model_states.pt"))
    state = torch.load(layer, weights_only=True)
    key = next(k for k, v in state.items() if v.dtype.is_floating_point)
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, layer)
    write_manifest(older)  # a NaN saved as such, not a corrupted file
    proc = _evaluate(ckpt, fi_dataset)
    assert proc.returncode == 3, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # no bare NaN
    assert result["loss"] is None and result["iteration"] == 2
    assert "the loss is not finite" in proc.stderr
