"""`convert reshard --with-optimizer --universal`: the offline, resumable conversion a layout
change needs. A conversion killed in the middle restarts where it stopped (finished work items
skipped) and ends with the same files as one that was never stopped; until then `train` at
another layout still refuses."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from tests.training.helpers import env, run_train

pytestmark = pytest.mark.distributed

KILL_AFTER_THIRD_MERGE = """
import os, sys
from deepspeed.checkpoint import ds_to_universal
from megatron_ext.convert import to_universal
real, calls = ds_to_universal.merge_tp_slices, [0]
def merge(*args):
    result = real(*args)
    calls[0] += 1
    if calls[0] == 3:  # its files written, its marker not yet
        os.kill(os.getpid(), 9)
    return result
to_universal._REAL["merge"] = merge
from megatron_ext.cli import main
main(sys.argv[1:])
"""


def _convert(ckpt, *, script: str | None = None) -> subprocess.CompletedProcess:
    args = ["convert", "reshard", "--with-optimizer", "--checkpoint", str(ckpt), "--universal"]
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "megatron_ext"]
    return subprocess.run(head + args, env=env(), text=True, capture_output=True, timeout=300)


def _tensors(universal_dir) -> dict:
    out = {}
    for path in sorted((universal_dir / "zero").glob("*/*.pt")):  # per parameter
        state = torch.load(path, weights_only=True)
        out[str(path.relative_to(universal_dir))] = state
    return out


def test_killed_conversion_resumes_to_the_same_files(fi_dataset, tmp_path):
    ckpt = tmp_path / "run"
    run_train("bloom", fi_dataset, ckpt, "train.iterations=2", "checkpoint.interval=2")
    reference = tmp_path / "reference"
    shutil.copytree(ckpt, reference)
    assert _convert(reference).returncode == 0

    killed = _convert(ckpt, script=KILL_AFTER_THIRD_MERGE)
    assert killed.returncode == -9, killed.stderr[-2000:]
    out = ckpt / "iter_0000002_universal"
    assert not (out / "complete.json").exists() and not (ckpt / "latest_universal").exists()
    assert len(list((out / "progress").glob("merge.*.json"))) == 2
    refused = run_train(
        "bloom", fi_dataset, ckpt, "train.iterations=3", "parallel.tp=2", nproc=2, check=False
    )
    assert refused.returncode == 2 and "--universal" in refused.stderr  # not complete: refused

    resumed = _convert(ckpt)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming a stopped conversion" in resumed.stderr
    assert (ckpt / "latest_universal").read_text() == out.name
    assert not (out / "progress").exists() and not (out / "tmp").exists()
    got, want = _tensors(out), _tensors(reference / "iter_0000002_universal")
    assert sorted(got) == sorted(want) and len(got) > 10
    for name, value in want.items():  # step.pt: a tensor; fp32/exp_avg*: {"param": ...}
        pairs = value.items() if isinstance(value, dict) else [("", value)]
        for key, expected in pairs:
            found = got[name][key] if key else got[name]
            if isinstance(expected, torch.Tensor):
                assert torch.equal(found, expected), (name, key)
            else:
                assert found == expected, (name, key)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--universal", "--tp", "2"], "converts in place: give --with-optimizer and --checkpoint"),
        (["--with-optimizer", "--universal", "--workers", "0"], "--workers 0: give at least 1"),
    ],
)
def test_reshard_universal_refuses_misuse(extra, message, tmp_path, capsys):
    from megatron_ext.cli import main

    assert main(["convert", "reshard", "--checkpoint", str(tmp_path), *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written
