"""`train` (and its --dry-run) refuses, with exit 2 and the key named, what a real run would
otherwise fail on later with a traceback or silently accept."""

from __future__ import annotations

import pytest

from megatron_ext.cli import main

BASE = ["train", "--config", "examples/tiny_bloom.yaml", "data.path=x", "checkpoint.dir=y"]
CASES = {
    "optim.lr=-1": "optim.lr=-1.0 must be a positive finite number",
    "optim.lr=.nan": "optim.lr=nan must be a positive finite number",
    "optim.min_lr=1": "optim.min_lr=1.0 must be finite, between 0 and optim.lr",
    "train.global_batch_size=0": "train.global_batch_size=0 must be >= 1",
    "logging.interval=0": "logging.interval=0 must be >= 1",
    "data.num_workers=-1": "data.num_workers=-1 must be >= 0",
    "train.collective_timeout_s=0": "train.collective_timeout_s=0.0 must be a positive number",
    "checkpoint.keep=-1": "checkpoint.keep must be >= 0 (0 keeps every checkpoint)",
    "checkpoint.save_timeout_s=0": "checkpoint.save_timeout_s=0.0 must be a positive number",
    "parallel.pp=3": "parallel.pp=3 is more pipeline stages than the model's 2 layers",
    "--reset-progress": "--reset-progress) needs checkpoint.load",
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("arg", list(CASES))
def test_dry_run_refuses(arg, capsys):
    assert main([*BASE, arg, "--dry-run"]) == 2
    assert CASES[arg] in capsys.readouterr().err


def test_no_processes_is_refused(capsys):
    assert main([*BASE, "--nproc-per-node", "0"]) == 2
    assert "--nproc-per-node 0: give at least 1 process" in capsys.readouterr().err


def test_a_good_config_still_dry_runs(capsys):
    assert main([*BASE, "checkpoint.keep=0", "--dry-run"]) == 0


def test_dry_run_refuses_what_does_not_fit_the_machine(capsys):
    """A sequence length whose estimate exceeds one rank's memory (this machine's RAM for a CPU
    run, or the stated device memory) used to dry-run fine and fail at the first step."""
    assert main([*BASE, "data.seq_length=200000", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "pipeline stage 0 needs about" in err and "GiB RAM / 1 ranks" in err
    assert main([*BASE, "--dry-run", "--device-memory-gb", "0.001"]) == 2
    assert "more than the 0.00 GiB one rank has (--device-memory-gb)" in capsys.readouterr().err
    assert main([*BASE, "--dry-run", "--device-memory-gb", "1"]) == 0
