"""Rendered jobs on a real Slurm (2 fake nodes): training, time-limit saves, requeue, chains,
arrays, scancel, an MPI launch and refusals. The trainer is tests/slurm/fake_trainer.py, a
stand-in that keeps `megatron-ext train`'s contract (checkpoints, `latest`, metrics, signals).

The three time-limit scenarios (requeue, afterany chain, array %1) need about a minute each of
Slurm time; they are submitted together when the module starts and run beside the other tests,
which keeps this module near a minute of wall time.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.slurm.helpers import (
    MPI_TRAINER,
    Jobs,
    events,
    hard_timeout,
    logs,
    metrics,
    reference_loss,
    run_cli,
    submit,
    write_run_config,
)

pytestmark = pytest.mark.slurm

# The first job trains to HOLD and waits there for USR1 (21-27 s after start with --time=1 min
# and USR1@30), saves and exits; the next job (requeued, next link, next array element) resumes
# from HOLD and finishes; later links exit at once.
ITERS = 40
HOLD = 20
STEP_S = 0.05
SCENARIOS = {
    "requeue": [],
    "chain": ["--chain", "4"],
    "array": ["--chain", "4", "--chain-mode", "array"],
}


@pytest.fixture(scope="module")
def scenarios(local_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("scenarios")
    tracker = Jobs()
    out = {}
    try:
        for name, extra in SCENARIOS.items():
            cfg = write_run_config(base / name / "run.yaml", ITERS, STEP_S, hold_at=HOLD)
            run_dir = base / name / "run"
            limit = ["--time", "00:01:00", "--signal-margin", "30"]
            ids = submit(run_dir, cfg, *limit, *extra)
            tracker.add(*ids)
            out[name] = (run_dir, ids)
        yield out
    finally:
        tracker.cancel()


@pytest.fixture(scope="module")
def final_loss_uninterrupted(scenarios, tmp_path_factory):
    run_dir, _ = scenarios["requeue"]
    return reference_loss(run_dir.parent / "run.yaml", tmp_path_factory.mktemp("reference"))


@pytest.fixture(autouse=True, scope="module")
def _start_scenarios_first(scenarios):
    """Submit the long scenarios before any test of this module runs."""


def test_two_tasks_on_two_nodes_train_and_checkpoint(tmp_path, jobs):
    cfg = write_run_config(tmp_path / "run.yaml", iterations=20, step_seconds=0.0, interval=5)
    run_dir = tmp_path / "run"
    jobs.add(*submit(run_dir, cfg))
    jobs.wait(timeout=90)
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000020", logs(run_dir)
    import torch

    state = torch.load(ckpt / "iter_0000020" / "state.pt")
    assert state["step"] == 20
    ranks = sorted((json.loads(x) for x in (ckpt / "ranks.jsonl").read_text().splitlines()),
                   key=lambda r: r["RANK"])  # fmt: skip
    assert [r["RANK"] for r in ranks] == ["0", "1"]
    assert [r["slurmd_node"] for r in ranks] == ["node1", "node2"]
    assert {r["WORLD_SIZE"] for r in ranks} == {"2"}
    assert {r["MASTER_ADDR"] for r in ranks} == {"node1"}
    assert [m["step"] for m in metrics(ckpt)] == list(range(1, 21))

    # A finished run: a new job exits at once without starting the trainer.
    jobs.add(*submit(run_dir, cfg))
    jobs.wait(timeout=60)
    assert events(run_dir)[-1]["event"] == "skip"
    assert "run already finished" in logs(run_dir)

    status = run_cli("slurm", "status", str(run_dir))
    assert status.returncode == 0, status.stderr
    assert "iteration 20 / 20 (100%) - finished" in status.stdout
    assert "COMPLETED" in status.stdout


def test_scancel_leaves_a_loadable_checkpoint(tmp_path, jobs):
    import subprocess
    import time

    import torch

    cfg = write_run_config(tmp_path / "run.yaml", iterations=10_000, step_seconds=0.05, interval=7)
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    jobs.add(*submit(run_dir, cfg))
    while not (ckpt / "latest").exists():  # bounded by the hard timeout
        time.sleep(0.5)
    assert subprocess.run(["scancel", *jobs.ids], timeout=30).returncode == 0
    jobs.wait(timeout=60)
    name = (ckpt / "latest").read_text().strip()
    step = int(name.removeprefix("iter_"))
    state = torch.load(ckpt / name / "state.pt")
    assert state["step"] == step > 0
    assert set(state["model"]) == {"weight", "bias"}
    # The tasks got SIGTERM, saved at the next step boundary and exited.
    assert "(signal 15)" in logs(run_dir)
    assert step == metrics(ckpt)[-1]["step"]


def test_mpi4py_two_ranks_over_pmix(tmp_path, jobs):
    pytest.importorskip("mpi4py")
    cfg = write_run_config(tmp_path / "run.yaml", iterations=1, step_seconds=0.0)
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    proc = run_cli(
        "slurm", "submit", "--profile", "local", "--nodes", "2", "--config", str(cfg),
        "--launcher", "mpi", "--train-cmd", f"python3 {MPI_TRAINER}", "-o", str(run_dir / "job.sbatch"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    jobs.add(*(json.loads(x)["job_id"] for x in (run_dir / "jobs.jsonl").read_text().splitlines()))
    jobs.wait(timeout=90)
    assert "  --mpi=pmix \\" in (run_dir / "job.sbatch").read_text()
    recs = [json.loads(x) for x in (ckpt / "mpi_ranks.jsonl").read_text().splitlines()]
    assert sorted(r["mpi_rank"] for r in recs) == [0, 1], logs(run_dir)
    assert {r["mpi_size"] for r in recs} == {2}
    assert {r["allreduce"] for r in recs} == {3}
    assert all(r["env_rank"] == r["mpi_rank"] == int(r["slurm_procid"]) for r in recs)
    assert sorted(r["node"] for r in recs) == ["node1", "node2"]


def test_refused_layout_queues_nothing(tmp_path, local_cluster):
    cfg = write_run_config(tmp_path / "run.yaml", iterations=10, step_seconds=0.0)
    proc = run_cli(
        "slurm", "submit", "--profile", "local", "--nodes", "2", "--config", str(cfg),
        "-o", str(tmp_path / "run" / "job.sbatch"), "parallel.tp=4",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "not divisible by parallel.tp x parallel.pp = 4 x 1" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was rendered or queued


def test_rendered_local_script_passes_sbatch_test_only(tmp_path, local_cluster):
    import subprocess

    cfg = write_run_config(tmp_path / "run.yaml", iterations=10, fake=False)
    script = tmp_path / "run" / "job.sbatch"  # runs `megatron-ext train`: checked, not started
    proc = run_cli(
        "slurm", "render", "--profile", "local", "--nodes", "2", "--config", str(cfg),
        "--tasks-per-node", "2", "-o", str(script), "train.global_batch_size=4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    test_only = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True,
                               text=True, timeout=30)  # fmt: skip
    assert test_only.returncode == 0, test_only.stderr
    assert "to start at" in test_only.stderr


def _wait_scenario(scenarios, name, timeout=240):
    run_dir, ids = scenarios[name]
    Jobs().wait(ids, timeout=timeout, poll=2)
    return run_dir, ids


def _assert_same_training(run_dir, final_loss_uninterrupted):
    ckpt = run_dir.parent / "ckpt"
    assert (ckpt / "latest").read_text().strip() == f"iter_{ITERS:07d}", logs(run_dir)
    steps = [m["step"] for m in metrics(ckpt)]
    assert steps == list(range(1, ITERS + 1))  # resumed exactly where it saved
    assert math.isclose(metrics(ckpt)[-1]["loss"], final_loss_uninterrupted, rel_tol=1e-6)
    ends = [e for e in events(run_dir) if e["event"] == "end"]
    assert [(e["iteration"], e["rc"]) for e in ends] == [(HOLD, 0), (ITERS, 0)]  # saved on USR1
    return ends


@hard_timeout(300)
def test_time_limit_signal_saves_and_requeues(scenarios, final_loss_uninterrupted):
    run_dir, ids = _wait_scenario(scenarios, "requeue")
    ends = _assert_same_training(run_dir, final_loss_uninterrupted)
    assert {e["job_id"] for e in ends} == set(ids)  # one job id, requeued
    assert ends[-1]["restart"] == 1
    assert "requeueing job" in logs(run_dir)


@hard_timeout(300)
def test_afterany_chain_resumes_and_later_links_exit(scenarios, final_loss_uninterrupted):
    run_dir, ids = _wait_scenario(scenarios, "chain")
    assert len(ids) == 4
    script = (run_dir / "job.sbatch").read_text()
    assert "REQUEUE=0" in script and "#SBATCH --requeue" not in script
    _assert_same_training(run_dir, final_loss_uninterrupted)
    evs = events(run_dir)
    firsts = [(e["job_id"], e["event"]) for e in evs if e["event"] != "end"]
    assert firsts == [(ids[0], "start"), (ids[1], "start"), (ids[2], "skip"), (ids[3], "skip")]
    status = run_cli("slurm", "status", "--json", str(run_dir))
    st = json.loads(status.stdout)
    assert st["finished"] and st["iteration"] == ITERS
    assert {s["state"] for s in st["job_states"].values()} == {"COMPLETED"}


@hard_timeout(300)
def test_array_one_at_a_time_resumes(scenarios, final_loss_uninterrupted):
    run_dir, ids = _wait_scenario(scenarios, "array")
    assert len(ids) == 1
    _assert_same_training(run_dir, final_loss_uninterrupted)
    evs = [e for e in events(run_dir) if e["event"] != "end"]
    assert [(e["array_task"], e["event"]) for e in evs] == [
        ("1", "start"), ("2", "start"), ("3", "skip"), ("4", "skip"),
    ]  # fmt: skip
    st = json.loads(run_cli("slurm", "status", "--json", str(run_dir)).stdout)
    assert len(st["job_states"]) == 4
