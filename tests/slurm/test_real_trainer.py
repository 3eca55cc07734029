"""The real `megatron-ext train` under a rendered `local` job: 2 tasks on 2 fake nodes, TP=2,
ranks wired from Slurm's variables; the losses equal the same run launched locally."""

from __future__ import annotations

import json
import sys

import pytest

from tests.slurm.helpers import hard_timeout, logs, run_cli
from tests.training.helpers import ROOT, losses, run_train

pytestmark = pytest.mark.slurm

OVERRIDES = ["parallel.tp=2", "train.iterations=8", "checkpoint.interval=4",
             "logging.tensorboard=false", "logging.eval_interval=0"]  # fmt: skip


@hard_timeout(240)
def test_rendered_job_trains_with_the_real_trainer(tmp_path, jobs, fi_dataset):
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt"
    train_cmd = f"{sys.executable} -m megatron_ext train --config {{config}}"
    proc = run_cli(
        "slurm", "submit", "--profile", "local", "--nodes", "2",
        "--config", str(ROOT / "examples" / "tiny_bloom.yaml"), "--train-cmd", train_cmd,
        "-o", str(run_dir / "job.sbatch"),
        f"data.path={fi_dataset}", f"checkpoint.dir={ckpt}", *OVERRIDES,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ids = [json.loads(line)["job_id"] for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    jobs.add(*ids)
    jobs.wait(timeout=200)
    assert (ckpt / "latest").read_text().strip() == "iter_0000008", logs(run_dir)
    slurm_losses = losses(ckpt)
    assert sorted(slurm_losses) == list(range(1, 9))

    local = tmp_path / "local"
    run_train("bloom", fi_dataset, local, *OVERRIDES, nproc=2)
    for step, loss in losses(local).items():
        assert abs(loss - slurm_losses[step]) <= 1e-6, (step, loss, slurm_losses[step])
