"""In-loop task evaluation: rank 0 evaluates every K-th checkpoint in the background, the results
land in ROOT/eval/, and training itself is not perturbed (the same losses as without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_ext.training.config import EvalConfig
from megatron_ext.training.in_loop_eval import InLoopEval
from tests.training.helpers import losses, run_train

pytestmark = pytest.mark.distributed


def test_every_second_checkpoint_is_evaluated_and_training_is_unchanged(fi_dataset, tmp_path):
    tokenizer = Path(fi_dataset).parent / "tokenizer"  # the dataset's own (vocab 1000)
    common = ["train.iterations=6", "checkpoint.interval=2", "parallel.tp=2"]
    run_train("bloom", fi_dataset, tmp_path / "plain", *common, nproc=2)
    ckpt = tmp_path / "ckpt"
    evals = [
        "eval.tasks=fi_gimp_completion",
        "eval.every_checkpoints=2",
        f"eval.tokenizer={tokenizer}",
        "eval.limit=8",
        "eval.device=cpu",
    ]
    proc = run_train("bloom", fi_dataset, ckpt, *common, *evals, nproc=2, timeout=400)

    assert losses(ckpt) == losses(tmp_path / "plain")  # exactly: the eval runs elsewhere
    # saves at 2, 4, 6: the second one (iteration 4) is evaluated, and waited for at the end
    out = ckpt / "eval"
    assert sorted(p.name for p in out.glob("iter_*.json")) == ["iter_0000004.json"]
    res = json.loads((out / "iter_0000004.json").read_text())
    acc = res["results"]["fi_gimp_completion"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["fi_gimp_completion"]["effective"] == 8
    assert res["config"]["model"] == str(ckpt / "hf-cache" / "iter_0000004")
    (row,) = [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]
    assert row["step"] == 4 and row["tag"] == "iter_0000004"
    assert row["metrics"]["fi_gimp_completion/acc"] == acc
    assert "in-loop eval of iter_0000004 started" in proc.stderr
    assert (out / "iter_0000004.log").stat().st_size > 0


def test_a_vanished_checkpoint_is_recorded_not_raised(fi_dataset, tmp_path):
    """keep-rotation deleted the tag dir before the eval read it: a summary row with the error;
    a checkpoint saved while an eval runs is skipped."""
    tokenizer = Path(fi_dataset).parent / "tokenizer"
    cfg = EvalConfig(
        tasks="fi_gimp_completion", every_checkpoints=1, tokenizer=str(tokenizer), limit=2
    )
    task_eval = InLoopEval(cfg, tmp_path, is_rank0=True)
    task_eval.after_save(3)  # there is no tmp_path/iter_0000003
    task_eval.after_save(4)  # the eval of 3 is still starting up (seconds): 4 is skipped
    task_eval.finish()
    (row,) = [json.loads(line) for line in (tmp_path / "eval" / "summary.jsonl").open()]
    assert row["step"] == 3 and "exited with 2" in row["error"]
    assert "iter_0000003" in (tmp_path / "eval" / "iter_0000003.log").read_text()
    assert not (tmp_path / "eval" / "iter_0000003.json").exists()
    assert task_eval.proc is None and not (tmp_path / "eval" / "iter_0000004.log").exists()


def test_the_other_ranks_start_nothing(tmp_path):
    cfg = EvalConfig(tasks="fi_gimp_completion", every_checkpoints=1, tokenizer=str(tmp_path))
    task_eval = InLoopEval(cfg, tmp_path, is_rank0=False)
    task_eval.after_save(2)
    task_eval.finish()
    assert task_eval.proc is None and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("wait_at_end_s, max_wait_s", [(0.5, None), (600.0, 0.5)])
def test_the_end_of_run_wait_is_capped_and_stops_the_eval(tmp_path, wait_at_end_s, max_wait_s):
    """eval.wait_at_end_s, or 80% of the collective timeout (max_wait_s) when lower, bounds the
    wait at the end of training: a longer eval (here one still importing lm-eval) is stopped and
    its row says so; no eval process is left behind."""
    import time

    import psutil

    cfg = EvalConfig(
        tasks="fi_gimp_completion", every_checkpoints=1, tokenizer=str(tmp_path),
        wait_at_end_s=wait_at_end_s,
    )  # fmt: skip
    task_eval = InLoopEval(cfg, tmp_path, is_rank0=True, max_wait_s=max_wait_s)
    task_eval.after_save(5)
    pid = task_eval.proc.pid
    start = time.monotonic()
    task_eval.finish()
    assert time.monotonic() - start < 20  # 0.5 s of waiting, then SIGTERM (30 s to SIGKILL)
    assert task_eval.proc is None and not psutil.pid_exists(pid)
    (row,) = [json.loads(line) for line in (tmp_path / "eval" / "summary.jsonl").open()]
    assert row["step"] == 5 and "exited with -15" in row["error"], row
