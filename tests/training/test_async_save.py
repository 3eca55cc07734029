"""Asynchronous checkpoint saves (checkpoint.async_save, issue 17.3): the snapshot is independent
of training, training goes on while the files are written, `latest` moves only when every
rank's part is on disk, and a kill -9 during the background write resumes exactly from the
previous checkpoint."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from megatron_ext.training.async_checkpoint import HostBuffers, check_sizes, snapshot
from tests.training.helpers import env, logged_steps, losses, run_train, train_cmd


def test_snapshot_is_a_host_copy_that_training_cannot_change():
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = collections.OrderedDict(
        module={"w": weight, "view": weight[1]},
        optimizer={"step": 3, "groups": [{"lr": 0.1, "params": (0, 1)}], "names": {"a"}},
        param_shapes=[{"w": torch.Size([2, 3])}],  # DeepSpeed's: zero_to_fp32 calls .numel()
        counts=collections.defaultdict(int, {"a": 1}),
    )
    buffers = HostBuffers()
    snap = snapshot(state, buffers, "mp_rank_00_model_states.pt")
    weight.add_(100)  # the next optimizer step
    state["optimizer"]["names"].add("b")
    assert torch.equal(snap["module"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(snap["module"]["view"], torch.tensor([3.0, 4.0, 5.0]))
    assert type(snap) is collections.OrderedDict and snap["optimizer"]["names"] == {"a"}
    assert snap["optimizer"]["groups"][0]["params"] == (0, 1)
    assert snap["param_shapes"][0]["w"].numel() == 6
    assert snap["counts"]["b"] == 0  # a defaultdict keeps its factory
    # the next save of the same file reuses the host buffers (no new allocation)
    again = snapshot(state, buffers, "mp_rank_00_model_states.pt")
    assert again["module"]["w"].data_ptr() == snap["module"]["w"].data_ptr()
    assert torch.equal(again["module"]["w"], weight)
    assert buffers.nbytes() == (6 + 3) * 4


def test_a_part_whose_file_changed_size_is_not_published(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"12345")
    assert check_sizes(tmp_path, {"a.pt": (5, "0")}) is None
    assert "5 bytes on disk, 4 written" in check_sizes(tmp_path, {"a.pt": (4, "0")})
    assert "6 written" in check_sizes(tmp_path, {"a.pt": (6, "0")})
    assert "missing" in check_sizes(tmp_path, {"b.pt": (1, "0")})


ARGS = ("parallel.pp=2", "train.iterations=8", "checkpoint.interval=2", "checkpoint.keep=10")


@pytest.fixture(scope="module")
def async_reference(fi_dataset, tmp_path_factory):
    """An uninterrupted 2-rank (pp=2) run with asynchronous saves every 2 steps."""
    ckpt = tmp_path_factory.mktemp("async") / "ref"
    proc = run_train("bloom", fi_dataset, ckpt, *ARGS, "checkpoint.async_save=true", nproc=2)
    return ckpt, proc


@pytest.mark.distributed
def test_async_saves_equal_synchronous_ones(async_reference, fi_dataset, tmp_path):
    """Same losses as synchronous saves, every checkpoint published with a manifest, and the
    saved tensors equal to those of a synchronous save of the same step."""
    ckpt, proc = async_reference
    assert "written in the background" in proc.stderr
    sync = tmp_path / "sync"
    run_train("bloom", fi_dataset, sync, *ARGS, nproc=2)
    assert losses(ckpt) == losses(sync)
    assert (ckpt / "latest").read_text() == "iter_0000008"
    for it in (2, 4, 6, 8):
        tag = ckpt / f"iter_{it:07d}"
        assert (tag / "manifest.json").is_file() and not (tag / ".parts").exists()
    assert not list(ckpt.glob("*.tmp"))
    for name in ("layer_01-model_00-model_states.pt", "rng_rank1.pt"):
        a = torch.load(ckpt / "iter_0000004" / name, weights_only=False)
        b = torch.load(sync / "iter_0000004" / name, weights_only=False)
        if name.startswith("rng"):  # numpy's generator is never seeded: its state is random
            a, b = ({k: d[k] for k in ("torch", "tracker")} for d in (a, b))
        _assert_same_tensors(a, b, name)
    a, b = (torch.load(d / "iter_0000004" / "mp_rank_01_model_states.pt") for d in (ckpt, sync))
    for key in ("iteration", "consumed_samples", "global_steps", "lr_scheduler"):
        assert a[key] == b[key], key
    # an optimizer shard too (the state the next steps mutate while it is written)
    optim = sorted(p.name for p in (ckpt / "iter_0000004").glob("*optim_states.pt"))
    assert optim
    a = torch.load(ckpt / "iter_0000004" / optim[0], weights_only=False)
    b = torch.load(sync / "iter_0000004" / optim[0], weights_only=False)
    assert a.keys() == b.keys()
    _assert_same_tensors(a["optimizer_state_dict"], b["optimizer_state_dict"])


def _assert_same_tensors(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}/{i}")


@pytest.mark.distributed
def test_kill_during_the_background_write_resumes_from_the_previous_checkpoint(
    async_reference, fi_dataset, tmp_path
):
    """Rank 1's background write of step 4 takes 60 s while training goes on past step 4; a
    kill -9 of every rank then leaves iter_0000002 as `latest` (iter_0000004 never published),
    and the resume from it gives the uninterrupted run's losses."""
    ckpt = tmp_path / "killed"
    proc = subprocess.Popen(
        train_cmd("bloom", fi_dataset, ckpt, *ARGS, "checkpoint.async_save=true", nproc=2),
        env=env({"slow_save_step": 4, "slow_save_rank": 1, "slow_save_s": 60}),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the launcher and both ranks: one process group to kill
    )
    deadline = time.monotonic() + 180
    while max(logged_steps(ckpt), default=0) < 6:  # training went on while step 4 is written
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline, "training did not go on during the write"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert "fault injection: rank 1 saves 60 s late" in err
    assert (ckpt / "latest").read_text() == "iter_0000002"
    assert not (ckpt / "iter_0000004").exists()

    resumed = run_train("bloom", fi_dataset, ckpt, *ARGS, "checkpoint.async_save=true", nproc=2)
    assert f"loaded checkpoint {ckpt / 'iter_0000002'}" in resumed.stderr
    ref = losses(async_reference[0])
    got = losses(ckpt)
    assert {s: got[s] for s in range(3, 9)} == {s: ref[s] for s in range(3, 9)}
    assert (ckpt / "latest").read_text() == "iter_0000008"


@pytest.mark.distributed
def test_a_stop_waits_for_the_background_write(fi_dataset, tmp_path):
    """A kill-switch stop right after a save whose write is slow: the run waits for the write,
    publishes it and exits 0 with `latest` on the step it stopped at."""
    ckpt = tmp_path / "stop"
    switch = tmp_path / "stop-now"
    proc = subprocess.Popen(
        train_cmd(
            "bloom",
            fi_dataset,
            ckpt,
            "train.iterations=50",
            "checkpoint.interval=3",
            "checkpoint.async_save=true",
            f"train.kill_switch_file={switch}",
            nproc=2,
        ),  # fmt: skip
        env=env({"slow_save_step": 3, "slow_save_rank": 0, "slow_save_s": 8}),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while max(logged_steps(ckpt), default=0) < 4:
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    switch.touch()
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(logged_steps(ckpt))
    assert stopped < 50
    assert (ckpt / "latest").read_text() == f"iter_{stopped:07d}"
    assert (ckpt / "iter_0000003" / "manifest.json").is_file()
    assert not list(Path(ckpt).glob("*.tmp"))


@pytest.mark.distributed
def test_a_failed_background_write_stops_the_run_naming_it(fi_dataset, tmp_path):
    """Rank 1's disk is full when it writes step 2's part: rank 0's finaliser stops waiting at
    once, the next save stops every rank with the error, and nothing is published."""
    ckpt = tmp_path / "full"
    started = time.monotonic()
    proc = run_train(
        "bloom", fi_dataset, ckpt, *ARGS, "checkpoint.async_save=true", nproc=2, check=False,
        faults={"fail_save_step": 2, "fail_save_rank": 1},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "No space left on device (fault injection)" in proc.stderr
    assert "not published" in proc.stderr
    assert time.monotonic() - started < 120  # not checkpoint.save_timeout_s (an hour)
    assert not (ckpt / "latest").exists() and not (ckpt / "iter_0000002").exists()


@pytest.mark.gpu
def test_snapshot_of_gpu_tensors_lands_in_pinned_host_memory():
    """The device path of the snapshot: CUDA tensors are copied (non-blocking) into pinned host
    buffers, synchronised before the writer reads them, and reused by the next save."""
    weight = torch.randn(1024, 1024, device="cuda")
    before = weight.cpu()
    buffers = HostBuffers()
    snap = snapshot({"w": weight, "step": torch.tensor(3, device="cuda")}, buffers, "f.pt")
    weight.add_(1.0)  # the next step, queued behind the copy on the same stream
    assert snap["w"].device.type == "cpu" and snap["w"].is_pinned()
    assert torch.equal(snap["w"], before)
    again = snapshot({"w": weight, "step": torch.tensor(4, device="cuda")}, buffers, "f.pt")
    assert again["w"].data_ptr() == snap["w"].data_ptr()
    assert torch.equal(again["w"], weight.cpu()) and int(again["step"]) == 4
