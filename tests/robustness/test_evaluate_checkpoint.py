"""`evaluate` evaluates the checkpoint it says (the newest complete one, with that checkpoint's
own config), prints valid JSON, and exits non-zero on a non-finite loss. It used to read
`latest`'s config whatever it loaded, and to print `NaN` (not JSON) with exit 0.

By default it evaluates every sample of the dataset once: the loss equals transformers' mean
over each sample, also when the sample count is not a multiple of the global batch (it used to
take 64 samples, cycling a smaller dataset); `--num-samples` beyond the dataset is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from megatron_ext.checkpoint_format import write_manifest
from tests.training.helpers import env, run_train

SEQ, NUM = 64, 43  # 43 samples: 5 rounds of micro-batch 4 x dp 2, then 3
TOL = 1e-5  # our engine against transformers, fp32: measured 3e-7 at four layouts


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


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    """(checkpoint, dataset prefix of exactly NUM samples of SEQ tokens, transformers' loss of
    each sample). The checkpoint is converted from a random tiny BLOOM whose embedding (tied to
    the head) is scaled up, so that the samples' losses differ (measured: 12.5 to 13.5)."""
    from megatron_ext.cli import main
    from megatron_ext.data.blend import build_datasets
    from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_ext.models import get_preset
    from megatron_ext.training.config import saved_run_config
    from tests.models.hf_cases import hf_model

    root = tmp_path_factory.mktemp("sized")
    model = hf_model(get_preset("tiny").replace(seq_length=SEQ), seed=3)
    with torch.no_grad():
        model.transformer.word_embeddings.weight.mul_(4)
    model.save_pretrained(root / "hf")
    args = ["convert", "from-hf", "--hf-dir", str(root / "hf"), "--output", str(root / "ckpt")]
    assert main(args) == 0
    rng, prefix = np.random.default_rng(0), str(root / "data")
    with IndexedDatasetBuilder(prefix, np.uint16) as builder:
        for length in (700, 520, 900, 410, 250):  # 2780 tokens: (2780 - 1) // 64 = 43
            builder.add_item(rng.integers(0, 1000, length))
        builder.finalize()
    seed = saved_run_config(root / "ckpt" / "iter_0000000" / "config.yaml").data.seed
    dataset, _, _ = build_datasets(prefix, SEQ, (NUM, 0, 0), split="1,0,0", seed=seed)
    losses = []
    with torch.no_grad():
        for i in range(NUM):
            sample = {k: torch.from_numpy(v) for k, v in dataset[i].items()}
            logits = model(sample["tokens"][None]).logits[0].float()
            losses.append(float(torch.nn.functional.cross_entropy(logits, sample["labels"])))
    return root / "ckpt", prefix, losses


def _evaluate_sized(sized, *extra):
    ckpt, prefix, _ = sized
    cmd = [sys.executable, "-m", "megatron_ext", "evaluate", "--checkpoint", str(ckpt),
           "--data-path", prefix, "--seq-length", str(SEQ), "--json", *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())


@pytest.mark.distributed
def test_default_evaluates_every_sample_once(sized):
    proc = _evaluate_sized(sized, "--pp", "2", "--nproc-per-node", "4")  # dp 2, micro-batch 4
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layout"] == {"tp": 1, "pp": 2, "dp": 2}
    assert result["samples"] == NUM
    losses = sized[2]
    reference = sum(losses) / NUM
    assert abs(result["loss"] - reference) < TOL, (result, reference)
    # leaving out the 3 samples past the last whole global batch would show (measured 7e-3)
    assert abs(sum(losses[:40]) / 40 - reference) > 100 * TOL


def test_more_samples_than_the_dataset_are_refused(sized):
    proc = _evaluate_sized(sized, "--num-samples", str(NUM + 1))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"--num-samples {NUM + 1}: {sized[1]} holds {NUM} samples of {SEQ} tokens" in proc.stderr
