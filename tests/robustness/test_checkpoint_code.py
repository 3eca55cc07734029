"""No code runs from a checkpoint file. A pickle that runs a command, padded to the size of the
file it replaces, used to pass the manifest's size check and run under `train` (resume),
`evaluate` and `convert reshard --with-optimizer` (weights_only=False in our RNG loader and in
DeepSpeed's checkpoint engine). Now each file's checksum is checked before it is unpickled, and
unpickling is weights-only with an allow-list: the payload is refused by name in each file kind,
with the manifest left alone (checksum) or rewritten to match (weights-only)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib

import pytest
import torch

from megatron_ext import checkpoint_format
from megatron_ext.checkpoint_format import CheckpointRefused
from megatron_ext.training import checkpointing
from tests.training.helpers import ROOT, env, losses, run_train

KINDS = [
    "rng_rank0.pt",
    "mp_rank_00_model_states.pt",
    "layer_01-model_00-model_states.pt",
    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
]


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker, *, fix_manifest: bool) -> None:
    """Replace PATH with a command-running pickle of the same size; optionally make the
    manifest agree with it (an attacker who can write the directory can do both)."""
    size = path.stat().st_size
    payload = pickle.dumps(_Payload(marker), protocol=2)
    assert len(payload) < size
    path.write_bytes(payload + b"\0" * (size - len(payload)))
    if fix_manifest:
        manifest_path = path.parent / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        crc = f"{zlib.crc32(path.read_bytes()):08x}"
        manifest["files"][path.name] = {"size": size, "crc32": crc}
        manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def saved(fi_dataset, tmp_path_factory):
    """A tiny BLOOM run at pp=2 with checkpoints at steps 2 and 4."""
    ckpt = tmp_path_factory.mktemp("code") / "ckpt"
    run_train("bloom", fi_dataset, ckpt, "train.iterations=4", "checkpoint.interval=2",
              "parallel.pp=2", nproc=2)  # fmt: skip
    return ckpt


def test_the_payload_runs_under_a_plain_load(saved, tmp_path, monkeypatch):
    """The planted file is a working exploit: torch.load(weights_only=False) runs it."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")  # as before this fix
    path = tmp_path / "rng_rank0.pt"
    shutil.copy(saved / "iter_0000004" / path.name, path)
    plant(path, tmp_path / "ran", fix_manifest=False)
    with pytest.raises(RuntimeError, match="magic number"):  # after the command ran
        torch.load(path, weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fix_manifest", [False, True], ids=["checksum", "weights-only"])
def test_each_file_kind_is_refused_by_name(saved, tmp_path, kind, fix_manifest):
    tag = tmp_path / "iter_0000004"
    shutil.copytree(saved / "iter_0000004", tag)
    marker = tmp_path / "ran"
    plant(tag / kind, marker, fix_manifest=fix_manifest)
    engine = checkpoint_format.checkpoint_engine()  # what DeepSpeed loads through
    with pytest.raises(CheckpointRefused) as err:
        if kind.startswith("rng_"):
            checkpointing._load_rng(tag / kind, checkpointing.Manifest(tag))
        else:
            engine.load(str(tag / kind), map_location="cpu")
    assert str(tag / kind) in str(err.value)
    assert ("checksum" in str(err.value)) != fix_manifest
    assert not marker.exists()
    # the untouched files of the same checkpoint still load
    other = next(k for k in KINDS[1:] if k != kind)
    assert isinstance(engine.load(str(tag / other), map_location="cpu"), dict)


def test_every_load_of_the_process_is_weights_only(saved, tmp_path, monkeypatch):
    """DeepSpeed's universal converter calls torch.load(weights_only=False) itself."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")  # restored after the test
    path = tmp_path / "x.pt"
    shutil.copy(saved / "iter_0000004" / KINDS[3], path)
    plant(path, tmp_path / "ran", fix_manifest=False)
    checkpoint_format.forbid_code_in_loads()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert not (tmp_path / "ran").exists()
    shutil.copy(saved / "iter_0000004" / KINDS[3], path)  # DeepSpeed's own types still load
    assert "optimizer_state_dict" in torch.load(path, weights_only=False)


def _copy(saved, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(saved, ckpt, ignore=shutil.ignore_patterns(".run.lock"))
    return ckpt


def test_train_resume_refuses_the_file_and_falls_back(saved, fi_dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    marker = tmp_path / "ran"
    zero = ckpt / "iter_0000004" / KINDS[3]
    plant(zero, marker, fix_manifest=True)
    plant(ckpt / "iter_0000004" / "rng_rank1.pt", marker, fix_manifest=False)
    proc = run_train("bloom", fi_dataset, ckpt, "train.iterations=5", "checkpoint.interval=2",
                     "parallel.pp=2", nproc=2)  # fmt: skip
    assert not marker.exists()
    assert f"{zero}: refused" in proc.stderr
    assert sorted(losses(ckpt)) == [1, 2, 3, 4, 5]  # steps 3-5 again, from iter_0000002
    assert "loaded checkpoint " + str(ckpt / "iter_0000002") in proc.stderr


def test_evaluate_refuses_a_changed_weight_file(saved, fi_dataset, tmp_path):
    ckpt = _copy(saved, tmp_path)
    layer = ckpt / "iter_0000004" / KINDS[2]
    plant(layer, tmp_path / "ran", fix_manifest=False)
    cmd = [sys.executable, "-m", "megatron_ext", "evaluate", "--checkpoint", str(ckpt),
           "--data-path", fi_dataset, "--num-samples", "8", "--nproc-per-node", "2"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{layer}: content checksum" in proc.stderr
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("kind", [KINDS[3], KINDS[1]])
def test_reshard_with_optimizer_refuses_before_loading(saved, tmp_path, kind):
    ckpt = _copy(saved, tmp_path)
    path = ckpt / "iter_0000004" / kind
    plant(path, tmp_path / "ran", fix_manifest=kind == KINDS[1])
    cmd = [sys.executable, "-m", "megatron_ext", "convert", "reshard", "--checkpoint", str(ckpt),
           "--output", str(tmp_path / "out"), "--tp", "1", "--pp", "1", "--with-optimizer"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env(), cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(path) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out").exists()
