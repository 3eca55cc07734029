"""Keeping a long run healthy: loss spikes skipped and stopped on, samples skipped
deterministically, rollback, the straggler report, the profiler and the pre-flight check.

One pipeline-parallel run (pp=2: the loss lives on the last stage) carries the spikes, the
straggler report and the profiler; it is rolled back and resumed, and compared with a run whose
data never held the spikes' samples."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext.errors import UserError
from megatron_ext.training import diagnostics, preflight, rollback
from megatron_ext.training.config import check_skip_samples
from megatron_ext.training.data import SkippedSamples, merge_skips, without_skipped
from tests.training.helpers import ROOT, env, losses, metrics, run_train

PP2 = ("parallel.pp=2", "train.spikes.window=8")


def test_skipped_samples_map_stream_positions_to_global_indices():
    skipped = SkippedSamples([[2, 4], [6, 7]])
    assert [skipped.index(p) for p in range(6)] == [0, 1, 4, 5, 7, 8]
    assert skipped.global_ranges(1, 5) == [(1, 2), (4, 6), (7, 8)]
    assert skipped.total() == 3
    data = list(range(10))
    assert list(without_skipped(data, [[2, 4], [6, 7]])) == [0, 1, 4, 5, 7, 8, 9]
    assert merge_skips([[8, 10]], [[0, 2], [1, 3]], None) == [[0, 3], [8, 10]]
    for bad in ([[3, 3]], [[0, 4], [2, 6]], [[5, 8], [0, 2]], [[-1, 2]]):
        with pytest.raises(UserError, match="skip_samples"):
            check_skip_samples(bad)
    # a resume at consumed_samples 1000 takes new ranges ahead of it, or ones already saved
    from megatron_ext.training.trainer import check_new_skips

    check_new_skips([[2000, 2100]], None, 1000, "d")
    check_new_skips([[500, 600]], [[400, 700]], 1000, "d")
    with pytest.raises(UserError, match="already read the samples before 1000.*rollback"):
        check_new_skips([[500, 600]], None, 1000, "d")


def test_failing_links_and_stragglers_are_named():
    rows = [
        {"rank": r, "host": h, "device_problem": None, "allreduce_gbps": 5.0, "sendrecv_gbps": s}
        for r, h, s in [(0, "nid1", 9.0), (1, "nid2", 0.2), (2, "nid3", 8.0)]
    ]
    rows[2]["device_problem"] = "its device cuda:0 fails: ECC error"
    text = preflight.failing(rows, floor=1.0)
    assert "rank 1 on nid2: send/recv 0.2 GB/s < minimum 1 GB/s" in text
    assert "rank 2 on nid3: its device cuda:0 fails" in text and "--exclude nid2,nid3" in text
    assert "rank 0" not in text and preflight.failing(rows[:1], floor=1.0) is None
    group = preflight.failing([dict(r, device_problem=None) for r in rows], floor=6.0)
    assert "all-reduce over 3 ranks: 5 GB/s < minimum 6 GB/s" in group  # names no rank
    assert "rank 0 on nid1" not in group and "rank 1 on nid2: send/recv" in group

    times = [
        {"rank": r, "host": f"n{r}", "stage": r % 2, "forward_ms": f, "backward_ms": 2 * f}
        | {"optimizer_ms": 1.0, "communication_ms": 5.0, "data_ms": 0.1}
        for r, f in enumerate([10.0, 20.0, 10.0, 20.0, 15.0, 20.0])
    ]
    worst = diagnostics.slowest(times, count=2)
    assert worst[0]["rank"] == 4 and worst[0]["stage"] == 0  # against stage 0's median, not 1's
    assert worst[0]["compute_ms"] == 46.0 and worst[0]["median_ms"] == 31.0
    assert "rank 4 on n4 (stage 0)" in diagnostics.report_text(worst)
    alone = diagnostics.slowest(times[:2], count=1)  # one rank per stage: all ranks' median
    assert alone[0]["rank"] == 1 and alone[0]["median_of"] == "all ranks"


class _Verdict:
    """A SpikeGuard stand-in: a fixed verdict for the optimizer (no engine, no collectives)."""

    skips = True

    def __init__(self, device, spike: bool):
        self.flag = torch.tensor(float(spike), device=device)

    def decide(self):
        return self.flag


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("fused", [False, True])
def test_a_spike_verdict_cancels_the_adamw_step(device, fused):
    """Both of SkippableAdamW's paths: the fused kernel's found_inf (CUDA/ROCm in training; torch
    also fuses on CPU, so CI runs it) and the plain step read on the host."""
    from megatron_ext.training.spikes import SkippableAdamW

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 8, device=device))
    opt = SkippableAdamW([w], lr=0.1, weight_decay=0.1, fused=fused)
    for spike in (False, True, False):
        opt.guard = _Verdict(device, spike)
        before = w.detach().clone()
        steps_before = opt.state[w]["step"].item() if opt.state else 0
        w.grad = torch.randn_like(w)
        opt.step()
        assert torch.equal(w.detach(), before) == spike
        assert opt.state[w]["step"].item() == steps_before + (0 if spike else 1)
    assert not hasattr(opt, "found_inf")


def _weights(tag_dir):
    files = sorted(tag_dir.glob("layer_*-model_states.pt"))
    return [torch.load(f, weights_only=True) for f in files]


def _same(a, b) -> bool:
    return all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x if k in y
    ) and len(a) == len(b)


def test_spikes_are_skipped_then_stop_and_a_rollback_trains_as_if_never_there(fi_dataset, tmp_path):
    ckpt = tmp_path / "run"
    proc = run_train(
        "bloom",
        fi_dataset,
        ckpt,
        *PP2,
        "train.iterations=10",
        "checkpoint.interval=1",
        "checkpoint.keep=0",
        "train.spikes.max_spikes=2",
        "logging.straggler_interval=3",
        "logging.profile_steps=[2,3]",
        nproc=2,
        check=False,
        faults={"spike_steps": [7, 9]},
    )
    assert proc.returncode == 3, proc.stderr[-4000:]
    rows = {r["step"]: r for r in metrics(ckpt)}
    assert [s for s, r in rows.items() if r["spike"]] == [7, 9]
    assert rows[7]["skipped"] and rows[7]["spike_samples"] == [[48, 56]]
    assert not rows[8]["skipped"] and rows[8]["loss"] < rows[7]["loss"] / 100
    # the spike's optimizer step was skipped: weights as before it; step 8 trained
    assert _same(_weights(ckpt / "iter_0000006"), _weights(ckpt / "iter_0000007"))
    assert not _same(_weights(ckpt / "iter_0000007"), _weights(ckpt / "iter_0000008"))
    assert "2 loss spikes within 128 steps" in proc.stderr
    assert f"rollback --checkpoint {ckpt} --to 6 --skip-samples 48:56 --skip-samples 64:72" in (
        proc.stderr
    )
    assert (ckpt / "latest").read_text().strip() == "iter_0000009"  # saved, then stopped

    # straggler report every 3 steps: both ranks, their stage and host
    assert "stragglers" not in rows[2]
    for step in (3, 6):
        report = rows[step]["stragglers"]
        assert {r["rank"] for r in report} == {0, 1} and {r["stage"] for r in report} == {0, 1}
        assert all(r["host"] == socket.gethostname() and r["compute_ms"] > 0 for r in report)
    assert "straggler report, step 6: rank" in proc.stderr
    # the profiler recorded steps 2-3 on rank 0, a TensorBoard trace
    (trace,) = (ckpt / "profile").glob("rank0*.pt.trace.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"train step 2", "train step 3"} <= names and "train step 4" not in names
    assert "pre-flight: 2 ranks see their devices" in proc.stderr

    with pytest.raises(UserError, match="already trained on the samples before 48"):
        rollback.rollback(ckpt, "iter_0000006", [[40, 50]])
    cmd = [sys.executable, "-m", "megatron_ext", "rollback", "--checkpoint", str(ckpt)]
    cmd += ["--to", "6", "--skip-samples", "48:56", "--skip-samples", "64:72"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    (aside,) = ckpt.glob("rolled-back-*")
    assert sorted(p.name for p in aside.glob("iter_*")) == [f"iter_000000{i}" for i in (7, 8, 9)]
    assert "64:72" in (aside / "WHY.txt").read_text()

    run_train("bloom", fi_dataset, ckpt, *PP2, "train.iterations=10", nproc=2)
    never = tmp_path / "never"
    run_train(
        "bloom",
        fi_dataset,
        never,
        *PP2,
        "train.iterations=10",
        "checkpoint.interval=100",
        "logging.straggler_interval=0",
        nproc=2,
        faults={"drop_samples": [[48, 56], [64, 72]]},
    )
    resumed, reference = losses(ckpt), losses(never)
    assert sorted(resumed) == list(range(1, 11))
    assert resumed == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert (
        "skip_samples:\n  - - 48\n    - 56\n  - - 64\n    - 72"
        in (ckpt / "iter_0000010" / "config.yaml").read_text()
    )


def test_preflight_names_the_slow_ranks(fi_dataset, tmp_path):
    proc = run_train(
        "bloom",
        fi_dataset,
        tmp_path / "slow",
        "train.preflight_min_gbps=1e9",
        nproc=2,
        check=False,
    )
    assert proc.returncode == 5, proc.stderr[-3000:]
    host = socket.gethostname()
    assert f"rank 0 on {host}: send/recv" in proc.stderr and f"rank 1 on {host}" in proc.stderr
    assert "all-reduce over 2 ranks" in proc.stderr
    assert f"--exclude {host}" in proc.stderr
    assert not list((tmp_path / "slow").glob("iter_*"))


class _FakeDS:
    """What SpikeGuard reads of DeepSpeed's pipeline engine and its ZeRO optimizer."""

    def __init__(self, device):
        self.total_loss, self.device = None, device
        self.optimizer = type("Zero", (), {"_global_grad_norm": None})()

    def is_last_stage(self):
        return True

    def gradient_accumulation_steps(self):
        return 2


def _judge_steps(rank, world_size, device_name):
    """Both DP ranks judge 8 ordinary steps and one spike; their own losses and grad norms
    differ (the norm by a rounding), their verdicts and windows must not. On a GPU every
    judgement runs with synchronising CUDA calls turned into errors."""
    from types import SimpleNamespace

    from megatron_ext.training.config import SpikeConfig
    from megatron_ext.training.spikes import SpikeGuard

    device = torch.device(device_name)
    ds = _FakeDS(device)
    engine = SimpleNamespace(ds=ds, ctx=SimpleNamespace(tp_rank=0, dp_size=world_size))
    guard = SpikeGuard(SpikeConfig(window=8), engine, device)
    flags = []
    for step in range(10):
        loss = 4.0 - 0.05 * step + 0.01 * rank + (300.0 if step == 8 else 0.0)
        ds.total_loss = torch.tensor(2 * loss, device=device)  # summed over 2 micro-batches
        ds.optimizer._global_grad_norm = torch.tensor(1.0 + 0.02 * (step % 3) + 1e-7 * rank)
        ds.optimizer._global_grad_norm = ds.optimizer._global_grad_norm.to(device)
        guard.begin()
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            guard.decide()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        flags.append(guard.spiked() is not None)
    return flags, guard.values.cpu(), guard.good.cpu()


@pytest.mark.distributed
def test_every_rank_judges_the_same_spike():
    from tests.distributed_utils import run_distributed_test

    (flags, values, good), (flags1, values1, good1) = run_distributed_test(_judge_steps, 2, "cpu")
    assert flags == flags1 == [False] * 8 + [True, False]
    assert torch.equal(values, values1) and torch.equal(good, good1)
    assert values[0, 2].item() == pytest.approx(3.905)  # step 2: the DP mean of both losses


@pytest.mark.gpu
def test_the_spike_judgement_never_waits_for_the_gpu():
    from tests.distributed_utils import run_distributed_test

    ((flags, _, _),) = run_distributed_test(_judge_steps, 1, "cuda", accelerator="auto")
    assert flags == [False] * 8 + [True, False]


def _profile_a_cuda_step(rank, world_size, out):
    from types import SimpleNamespace

    profiler = diagnostics.Profiler(
        [1, 1], [0], SimpleNamespace(checkpoint=SimpleNamespace(dir=out))
    )
    run = SimpleNamespace(step=1)
    profiler.before_step(run)
    x = torch.randn(256, 256, device="cuda")
    (x @ x).sum().item()
    profiler.after_step(run, {})
    return sorted(p.name for p in (Path(out) / "profile").iterdir())


@pytest.mark.gpu
def test_the_profiler_writes_a_cuda_trace_and_memory_snapshot(tmp_path):
    from tests.distributed_utils import run_distributed_test

    (names,) = run_distributed_test(_profile_a_cuda_step, 1, str(tmp_path), accelerator="auto")
    assert "memory_rank0.pickle" in names and any(n.endswith(".pt.trace.json") for n in names)
