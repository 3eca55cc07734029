"""The real `megatron-ext train` under rendered `local` jobs that are interrupted and resumed:
requeue after Slurm's own time-limit signal, requeue after the same signal sent by hand, a chain
of dependent jobs, and scancel. Each interrupted run must end with the same per-step losses as one
uninterrupted local run of the same config.

Slurm's warning signal (`--time=1` minute, `--signal=USR1@30`) comes 21-27 s after the job starts
on this cluster (slurmctld checks limits every 30 s), long after the tiny model would have
finished; in that test the first job trains HOLD steps and then waits at the step boundary
(the `hold_step` fault of tests/training/faults.py, a step hook: only a run that starts before HOLD waits) until
the signal makes it save and exit. The other tests send the signal themselves
(`scancel --signal=USR1 JOB`, which reaches every task of the job's steps and not the batch shell,
as `#SBATCH --signal=USR1@margin` does) once the trainer has logged a few steps, so they take
seconds of Slurm time instead of a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.helpers import events, hard_timeout, logs, run_cli
from tests.training.helpers import ROOT, env, logged_steps, losses, run_train

pytestmark = pytest.mark.slurm

ITERS = 24
SIGNAL_AT = 3  # the test interrupts the first job once this step is logged
# seq 128: ~0.15 s per step with 2 ranks on 2 cores, so ITERS - SIGNAL_AT steps leave seconds
# for the signal to arrive; checkpoint.interval > ITERS: the only saves are on a signal or the end.
OVERRIDES = ["parallel.tp=2", f"train.iterations={ITERS}", "data.seq_length=128",
             "checkpoint.interval=1000", "logging.tensorboard=false", "logging.eval_interval=0"]  # fmt: skip


def _submit(run_dir: Path, ckpt: Path, data: str, *extra: str, faults=None) -> list[str]:
    train_cmd = f"{sys.executable} -m megatron_ext train --config {{config}}"
    proc = run_cli(
        "slurm", "submit", "--profile", "local", "--nodes", "2",
        "--config", str(ROOT / "examples" / "tiny_bloom.yaml"), "--train-cmd", train_cmd,
        "-o", str(run_dir / "job.sbatch"), *extra,
        f"data.path={data}", f"checkpoint.dir={ckpt}", *OVERRIDES, env=env(faults),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(x)["job_id"] for x in (run_dir / "jobs.jsonl").read_text().splitlines()]


def _signal_when_logged(job_id: str, ckpt: Path, step: int, signal: str | None) -> None:
    """Wait (bounded by the test's hard timeout) until `step` is logged, then scancel the job
    (`signal` None) or send it `signal`."""
    while max(logged_steps(ckpt), default=0) < step:
        time.sleep(0.1)
    argv = ["scancel"] + ([f"--signal={signal}"] if signal else []) + [job_id]
    assert subprocess.run(argv, timeout=30).returncode == 0


def _saved_iteration(ckpt: Path) -> int:
    return int((ckpt / "latest").read_text().strip().removeprefix("iter_"))


def _assert_same_losses(ckpt: Path, reference: dict[int, float]) -> None:
    got = losses(ckpt)
    assert sorted(got) == list(range(1, ITERS + 1))  # one row per step: resumed where it saved
    for step, loss in reference.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


@pytest.fixture(scope="module")
def reference(fi_dataset, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the uninterrupted run, launched locally (no Slurm)."""
    ckpt = tmp_path_factory.mktemp("uninterrupted")
    run_train("bloom", fi_dataset, ckpt, *OVERRIDES, nproc=2)
    got = losses(ckpt)
    assert sorted(got) == list(range(1, ITERS + 1))
    return got


@hard_timeout(240)
def test_signal_saves_requeues_and_matches_uninterrupted(tmp_path, jobs, fi_dataset, reference):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    ids = _submit(run_dir, ckpt, fi_dataset)
    jobs.add(*ids)
    _signal_when_logged(ids[0], ckpt, SIGNAL_AT, "USR1")
    jobs.wait(timeout=200)
    ends = [e for e in events(run_dir) if e["event"] == "end"]
    assert len(ends) == 2, logs(run_dir)
    first, second = ends
    # The first run saved on USR1 before the target and exited 0; the script requeued the same
    # job id, which resumed from that checkpoint and finished.
    assert SIGNAL_AT <= first["iteration"] < ITERS and first["rc"] == 0
    assert (second["iteration"], second["rc"], second["restart"]) == (ITERS, 0, 1)
    assert first["job_id"] == second["job_id"] == ids[0]
    text = logs(run_dir)
    assert f"stopping at step {first['iteration']}: signal SIGUSR1" in text
    assert "requeueing job" in text
    assert _saved_iteration(ckpt) == ITERS
    _assert_same_losses(ckpt, reference)


HOLD = 8


@hard_timeout(300)
def test_slurm_time_limit_signal_saves_requeues_and_matches(tmp_path, jobs, fi_dataset, reference):
    """No signal from the test: Slurm's own `--signal=USR1@30` before a one-minute limit."""
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    limit = ["--time", "00:01:00", "--signal-margin", "30"]
    ids = _submit(run_dir, ckpt, fi_dataset, *limit, faults={"hold_step": HOLD})
    jobs.add(*ids)
    jobs.wait(timeout=260)
    ends = [e for e in events(run_dir) if e["event"] == "end"]
    # On a loaded machine the signal may come while the trainer still starts up or before it
    # reaches HOLD: it then stops at its first step boundary, saving what it has (or nothing
    # new at step 0), and the job is requeued all the same (it used to die of the signal),
    # possibly more than once; the last leg finishes the run.
    assert len(ends) >= 2, logs(run_dir)
    *stopped, last = ends
    assert (last["iteration"], last["rc"], last["restart"]) == (ITERS, 0, len(stopped))
    iterations = [e["iteration"] for e in stopped]
    assert all(e["rc"] == 0 for e in stopped) and max(iterations) <= HOLD, logs(run_dir)
    assert iterations == sorted(iterations)
    assert {e["job_id"] for e in ends} == {ids[0]}
    text = logs(run_dir)
    first = stopped[0]["iteration"]
    saved = "no step was run, nothing to save" if first == 0 else "checkpoint saved"
    assert f"stopping at step {first}: signal SIGUSR1 ({saved})" in text, text[-3000:]
    assert "requeueing job" in text
    assert "#SBATCH --signal=USR1@30" in (run_dir / "job.sbatch").read_text()
    _assert_same_losses(ckpt, reference)


@hard_timeout(240)
def test_chain_links_resume_and_later_links_exit(tmp_path, jobs, fi_dataset, reference):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    ids = _submit(run_dir, ckpt, fi_dataset, "--chain", "3")
    jobs.add(*ids)
    assert len(ids) == 3
    _signal_when_logged(ids[0], ckpt, SIGNAL_AT, "USR1")
    jobs.wait(timeout=200)
    evs = events(run_dir)
    starts = [(e["job_id"], e["event"], e["iteration"]) for e in evs if e["event"] != "end"]
    ends = [(e["job_id"], e["iteration"], e["rc"]) for e in evs if e["event"] == "end"]
    saved = ends[0][1]
    assert SIGNAL_AT <= saved < ITERS, logs(run_dir)
    # link 1 from scratch, link 2 from link 1's save, link 3 finds the run finished
    assert starts == [(ids[0], "start", 0), (ids[1], "start", saved), (ids[2], "skip", ITERS)]
    assert ends == [(ids[0], saved, 0), (ids[1], ITERS, 0)]
    assert "REQUEUE=0" in (run_dir / "job.sbatch").read_text()  # chained: the next link resumes
    _assert_same_losses(ckpt, reference)
    st = json.loads(run_cli("slurm", "status", "--json", str(run_dir)).stdout)
    assert st["finished"] and st["iteration"] == ITERS


@hard_timeout(240)
def test_scancel_leaves_a_checkpoint_that_loads_and_resumes(tmp_path, jobs, fi_dataset, reference):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    ids = _submit(run_dir, ckpt, fi_dataset)
    jobs.add(*ids)
    _signal_when_logged(ids[0], ckpt, SIGNAL_AT, None)  # scancel: SIGTERM to every task
    jobs.wait(timeout=120)
    saved = _saved_iteration(ckpt)  # the only save of this run: on SIGTERM, before KillWait
    assert SIGNAL_AT <= saved < ITERS, logs(run_dir)
    assert saved == max(logged_steps(ckpt))
    assert f"stopping at step {saved}: signal SIGTERM" in logs(run_dir)

    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext", "evaluate", "--checkpoint", str(ckpt),
         "--data-path", fi_dataset, "--num-samples", "8", "--json", "--nproc-per-node", "2"],
        capture_output=True, text=True, timeout=180, env=env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["layout"]["tp"] == 2 and 0 < result["loss"] < 10

    # Resuming the cancelled run (locally) reproduces the uninterrupted one step for step.
    run_train("bloom", fi_dataset, ckpt, *OVERRIDES, nproc=2)
    _assert_same_losses(ckpt, reference)
