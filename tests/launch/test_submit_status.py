"""Submission commands (chains, arrays) and `slurm status`, with Slurm's answers faked."""

from __future__ import annotations

import json

import pytest
import yaml

from megatron_ext.errors import UserError
from megatron_ext.launch.profiles import load_profile
from megatron_ext.launch.render import RenderOptions, prepare_job
from megatron_ext.launch.status import format_status, run_status
from megatron_ext.launch.submit import submit_job

RUN = {
    "parallel": {"tp": 1, "pp": 1},
    "data": {"path": "data/fi"},
    "train": {"iterations": 100, "micro_batch_size": 1, "global_batch_size": 8},
    "checkpoint": {"dir": "ckpt"},
}


@pytest.fixture
def job_factory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(RUN))

    def make(requeue=None):
        return prepare_job(RenderOptions(
            profile=load_profile("local"), nodes=2, config=tmp_path / "run.yaml",
            output=tmp_path / "run" / "job.sbatch", requeue=requeue,
        ))  # fmt: skip

    return make


class FakeSbatch:
    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, argv):
        self.calls.append(list(argv))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise UserError("sbatch failed")
        return f"{100 + len(self.calls)};cluster\n"


def test_chain_with_afterany(job_factory):
    sbatch = FakeSbatch()
    ids = submit_job(job_factory(requeue=False), chain=3, run=sbatch)
    assert ids == ["101", "102", "103"]
    assert [c[2:-1] for c in sbatch.calls] == [
        [],
        ["--dependency=afterany:101"],
        ["--dependency=afterany:102"],
    ]
    script = sbatch.calls[0][-1]
    assert "REQUEUE=0" in open(script).read()
    recs = [json.loads(x) for x in open(job_factory().run_dir / "jobs.jsonl")]
    assert [r["link"] for r in recs] == [1, 2, 3]


def test_array_one_at_a_time(job_factory):
    sbatch = FakeSbatch()
    assert submit_job(job_factory(requeue=False), 4, "array", run=sbatch) == ["101"]
    assert "--array=1-4%1" in sbatch.calls[0]


def test_bad_chain_arguments(job_factory):
    with pytest.raises(UserError, match="--chain 0"):
        submit_job(job_factory(), chain=0, run=FakeSbatch())
    with pytest.raises(UserError, match="--chain-mode x"):
        submit_job(job_factory(), chain=2, chain_mode="x", run=FakeSbatch())


def test_status_reads_run_files_and_slurm(job_factory, tmp_path):
    job = job_factory()
    submit_job(job, chain=2, run=FakeSbatch())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("iter_0000060\n")
    with open(ckpt / "metrics.jsonl", "w") as f:
        for step in (59, 60):
            f.write(json.dumps({"step": step, "loss": 2.5 - step / 100, "tokens_per_s": 1234.0}))
            f.write("\n")
        f.write('{"step": 61, "lo')  # a line being written
    (job.run_dir / "events.jsonl").write_text(
        json.dumps({"job_id": "101", "array_job": "", "event": "start", "iteration": 0}) + "\n"
        + json.dumps({"job_id": "101", "array_job": "", "event": "end", "iteration": 60}) + "\n"
    )  # fmt: skip

    def query(argv):
        if argv[0] == "squeue":
            return "102|102|N/A|PENDING|0:00|Dependency\n999|999|N/A|RUNNING|1:00|None\n"
        if argv[0] == "sacct":
            return None  # no accounting on this cluster
        return "JobId=101 JobName=x JobState=COMPLETED Reason=None RunTime=00:10:00 ExitCode=0:0\n"

    st = run_status(job.run_dir, query)
    assert (st["iteration"], st["target_iterations"], st["finished"]) == (60, 100, False)
    assert st["last_loss"] == pytest.approx(1.9) and st["last_step"] == 60
    assert st["job_states"]["101"]["state"] == "COMPLETED"
    assert st["job_states"]["102"]["state"] == "PENDING"
    assert "999" not in st["job_states"]
    text = format_status(st)
    assert "iteration 60 / 100 (60%)" in text
    assert "last loss: 1.9000 at step 60; 1,234 tokens/s" in text
    assert "last at iteration 60" in text


def test_status_without_run_json(tmp_path):
    with pytest.raises(UserError, match="run.json not found"):
        run_status(tmp_path)
