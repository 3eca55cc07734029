"""YAML that expands (aliases nested: the "billion laughs") or values that are huge: a 500-byte
blend file used to take 4 GB and a run config made a 351 MB error message, because errors
printed whole values. Aliases are refused with the file named, and an error prints a bounded
excerpt of any value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_ext.config import MAX_YAML_BYTES, read_yaml
from megatron_ext.data.blend import BlendConfig
from megatron_ext.errors import UserError
from tests.training.helpers import ROOT, env

LAUGHS = "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" if i else "l0: &l0 [lol, lol, lol]\n"
    for i in range(9)
)


def _megatron(*args):
    cmd = [sys.executable, "-m", "megatron_ext", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env(), cwd=ROOT)


def test_a_run_config_with_aliases_is_refused_briefly(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(LAUGHS + "model: *l8\n")
    assert len(config.read_bytes()) < 600
    with pytest.raises(UserError, match=r"aliases \(\*l0\) are not accepted") as err:
        read_yaml(config)
    assert str(config) in str(err.value) and len(str(err.value)) < 1000
    proc = _megatron("train", "--config", str(config), "--dry-run")
    assert proc.returncode == 2 and "aliases" in proc.stderr and len(proc.stderr) < 2000


def test_a_blend_with_aliases_is_refused(tmp_path):
    blend = tmp_path / "blend.yaml"
    lines = ["- &l0 [{path: a, weight: 1}, {path: b, weight: 1}]"]
    lines += [f"- &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    blend.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="aliases") as err:
        BlendConfig.from_yaml(blend)
    assert str(blend) in str(err.value)
    proc = _megatron(
        "inspect-blend", "--blend", str(blend), "--seq-length", "8", "--num-samples", "9"
    )
    assert proc.returncode == 2 and "aliases" in proc.stderr and len(proc.stderr) < 2000


def test_a_huge_value_is_quoted_in_part(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  iterations: [" + ", ".join(["12345"] * 200_000) + "]\n")
    proc = _megatron("train", "--config", str(config), "--dry-run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.iterations: expected int, got [12345, 12345" in proc.stderr
    assert len(proc.stderr) < 2000
    huge = "x" * (MAX_YAML_BYTES + 1)
    config.write_text(f"# {huge}\n")
    with pytest.raises(UserError, match="a config file is at most"):
        read_yaml(config)
    # an override carries no alias either
    proc = _megatron("train", "--config", str(ROOT / "examples/tiny_bloom.yaml"), "--dry-run",
                     "data.path=x", "checkpoint.dir=y", "model.preset=*a")  # fmt: skip
    assert proc.returncode == 2 and "aliases" in proc.stderr
