"""Weights & Biases beside TensorBoard (training/metrics.py), offline: the scalars of
metrics.jsonl are read back from the run's own `.wandb` file, a resume continues the same run,
and no connection is made (W&B's server and every proxy point at a local socket that counts
them). About 1 s (measured): each writer starts and stops wandb's service process."""

from __future__ import annotations

import json
import math
import socket
import struct
import zlib
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from megatron_ext.errors import UserError
from megatron_ext.training.config import WandbConfig
from megatron_ext.training.metrics import WANDB_RUN_ID, MetricsWriter, read_metrics

_BLOCK, _HEADER = 32768, 7  # LevelDB log blocks; 7-byte file header and record header


def wandb_records(path: Path):
    """The protobuf Records of a `.wandb` file (LevelDB log format, CRC-32 checked)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        body = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:
            break
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad CRC at {pos}"
        parts += body
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def offline_history(wandb_dir: Path) -> tuple[set[str], dict[int, dict]]:
    """(run ids, {step: {key: value}}) of every offline run under WANDB_DIR, W&B's own `_`
    keys left out."""
    ids, steps = set(), {}
    for path in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                steps[record.history.step.num] = {
                    k: float(json.loads(v)) for k, v in items.items() if not k.startswith("_")
                }
    return ids, steps


def logged_scalars(row: dict) -> dict:
    """What TensorBoard gets of a metrics.jsonl row (finite numbers; booleans as 0/1)."""
    return {
        f"train/{k}": float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
    }


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Offline W&B with its files under tmp_path; returns the listening socket that every
    server and proxy address points at (a connection would wait in its backlog)."""
    sentinel = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sentinel.getsockname()[1]}"
    for name in ("WANDB_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                 "https_proxy", "all_proxy"):  # fmt: skip
        monkeypatch.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test (the writer sets it)
    yield sentinel
    sentinel.close()


ROWS = [
    {"step": 1, "loss": 10.5, "skipped": False, "lr": 3e-4, "grad_norm": 1.25,
     "consumed_samples": 8, "mfu": None, "stragglers": [{"rank": 1, "ms": 3.5}]},
    {"step": 2, "loss": 9.75, "skipped": False, "lr": 2.5e-4, "grad_norm": float("nan"),
     "consumed_samples": 16, "tokens_per_s": 1234.5678},
    {"step": 3, "loss": None, "skipped": True, "lr": 2e-4, "consumed_samples": 24,
     "val_loss": 9.5, "val_ppl": math.exp(9.5)},
    {"step": 4, "loss": 9.25, "skipped": False, "lr": 1e-4, "consumed_samples": 32},
]  # fmt: skip


def test_offline_run_holds_the_metrics_rows_and_resumes(tmp_path, offline):
    ckpt = tmp_path / "ckpt"
    cfg = WandbConfig(project="megatron-ext-test", name="tiny")
    writer = MetricsWriter(str(ckpt), True, tensorboard=False, wandb=cfg)
    for row in ROWS[:2]:
        writer.write(row)
    writer.close()
    run_id = (ckpt / WANDB_RUN_ID).read_text().strip()
    ids, steps = offline_history(ckpt / "wandb")
    assert ids == {run_id}
    assert steps == {r["step"]: logged_scalars(r) for r in read_metrics(ckpt / "metrics.jsonl")}
    assert steps[1]["train/skipped"] == 0.0 and "train/mfu" not in steps[1]

    # a restart from the checkpoint of step 2 continues the same W&B run
    writer = MetricsWriter(str(ckpt), True, tensorboard=False, resume_step=2, wandb=cfg)
    for row in ROWS[2:]:
        writer.write(row)
    writer.close()
    ids, steps = offline_history(ckpt / "wandb")
    assert ids == {run_id} and (ckpt / WANDB_RUN_ID).read_text().strip() == run_id
    rows = read_metrics(ckpt / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert {s: steps[s] for s in (3, 4)} == {r["step"]: logged_scalars(r) for r in rows[2:]}

    offline.setblocking(False)
    with pytest.raises(BlockingIOError):  # no connection waits: nothing tried the network
        offline.accept()


def test_online_without_credentials_is_refused_at_start(tmp_path, offline):
    cfg = WandbConfig(project="megatron-ext-test", mode="online")
    with pytest.raises(UserError, match=r"mode=online needs W&B credentials .*WANDB_API_KEY"):
        MetricsWriter(str(tmp_path / "ckpt"), True, tensorboard=False, wandb=cfg)


def test_no_project_no_wandb(tmp_path):
    writer = MetricsWriter(str(tmp_path), True, tensorboard=False, wandb=WandbConfig())
    writer.write(ROWS[0])
    writer.close()
    assert writer.wandb is None and not (tmp_path / "wandb").exists()
