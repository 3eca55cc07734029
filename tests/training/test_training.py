"""`megatron-ext train` on one process with the bundled Finnish data: the loss falls, metrics,
TensorBoard, checkpoints (atomic, keep-K, resolved config), evaluate, dry-run, loss curve."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import yaml

from tests.training.helpers import TINY, env, losses, metrics, run_train


def test_tiny_bloom_loss_falls_on_finnish_data(fi_dataset, tmp_path):
    ckpt = tmp_path / "run"
    run_train(
        "bloom",
        fi_dataset,
        ckpt,
        "train.iterations=60",
        "checkpoint.interval=20",
        "checkpoint.keep=2",
        "logging.tensorboard=true",
        "logging.eval_interval=30",
        "logging.peak_tflops=0.5",
    )
    rows = metrics(ckpt)
    loss = losses(ckpt)
    assert sorted(loss) == list(range(1, 61))
    # Measured: 6.87 (about ln 1000 = 6.91, uniform) -> 5.46 after 60 steps of 8 x 64 tokens.
    first, last5 = loss[1], sum(loss[s] for s in range(56, 61)) / 5
    assert first > 6.5 and last5 < first - 1.0, (first, last5)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < 6.0 and vals[1] < vals[0]
    for key in (
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops_per_device",
        "peak_memory_gb",
        "consumed_samples",
    ):
        assert rows[-1][key] is not None and rows[-1][key] > 0, key
    assert rows[-1]["consumed_samples"] == 60 * 8
    # no recomputation: hardware FLOPs = model FLOPs; MFU against the given peak
    assert rows[-1]["hw_tflops_per_device"] == rows[-1]["tflops_per_device"]
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["tflops_per_device"] / 0.5)
    assert list((ckpt / "tensorboard").glob("events.out.tfevents.*"))
    # keep the last 2; latest names the newest; each holds the resolved config + manifest
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000040", "iter_0000060"]
    assert (ckpt / "latest").read_text() == "iter_0000060"
    saved = yaml.safe_load((ckpt / "iter_0000060" / "config.yaml").read_text())
    assert saved["data"]["path"] == fi_dataset and saved["train"]["iterations"] == 60
    assert "preset" not in saved["model"] and saved["model"]["num_layers"] == 2  # resolved
    assert json.loads((ckpt / "iter_0000060" / "manifest.json").read_text())["files"]
    assert not list(ckpt.glob("*.tmp"))

    from megatron_ext.training.metrics import plot_loss_curve

    png = plot_loss_curve(ckpt / "metrics.jsonl", tmp_path / "loss.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    # evaluate at the training layout and at pp=2 x dp=2 (another layout): same loss
    def evaluate(*extra):
        cmd = [
            sys.executable,
            "-m",
            "megatron_ext",
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data-path",
            fi_dataset,
            "--num-samples",
            "16",
            "--json",
            *extra,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    one, four = evaluate(), evaluate("--pp", "2", "--nproc-per-node", "4")
    assert one["loss"] < 6.0 and one["perplexity"] == pytest.approx(math.exp(one["loss"]))
    assert four["layout"] == {"tp": 1, "pp": 2, "dp": 2}
    assert four["loss"] == pytest.approx(one["loss"], abs=1e-5)


def test_dry_run_prints_config_layout_and_memory():
    cmd = [
        sys.executable,
        "-m",
        "megatron_ext",
        "train",
        "--config",
        str(TINY["llama"]),
        "data.path=/nonexistent",
        "checkpoint.dir=/tmp/x",
        "parallel.pp=2",
        "parallel.tp=2",
        "--nproc-per-node",
        "8",
        "--dry-run",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # the resolved model (every field), not the preset's name; stdout is the report alone
    assert out.startswith("model:\n  family: llama\n") and "stage 1: layers" in out
    report = json.loads(out[out.index("{\n") :])
    assert report["layout"] == {
        "tp": 2,
        "pp": 2,
        "dp": 2,
        "world_size": 8,
        "grad_accumulation_steps": 1,
    }
    assert len(report["stages"]) == 2 and all(s["memory_gb"] > 0 for s in report["stages"])


def test_bad_layout_is_a_user_error(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "megatron_ext",
        "train",
        "--config",
        str(TINY["bloom"]),
        "data.path=x",
        f"checkpoint.dir={tmp_path}",
        "parallel.tp=3",
        "--nproc-per-node",
        "2",
        "--dry-run",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env())
    assert proc.returncode == 2 and "not divisible" in proc.stderr


def test_token_ids_beyond_the_model_vocabulary_are_a_clear_error(
    tmp_path, fi_sample_path, bpe_tokenizer_dir
):
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess

    prefix = tmp_path / "wide"  # a 2000-token tokenizer against the tiny preset's 1000
    preprocess(
        PreprocessConfig(
            inputs=[str(fi_sample_path)],
            output_prefix=str(prefix),
            tokenizer=str(bpe_tokenizer_dir),
            append_eod=True,
            progress=False,
        )
    )
    proc = run_train("bloom", str(prefix), tmp_path / "run", "train.iterations=2", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (
        f"{prefix}: token id" in proc.stderr
        and "outside the model's vocabulary of 1000" in proc.stderr
    )
    assert "Traceback" not in proc.stderr
