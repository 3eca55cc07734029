"""Task evaluation during training: rank 0 runs `megatron-ext eval` on every K-th checkpoint
it saves, as a background process, so that training does not wait for it.

    ROOT/eval/iter_XXXXXXX.json   lm-eval's results for that checkpoint
    ROOT/eval/iter_XXXXXXX.log    the eval process's output
    ROOT/eval/summary.jsonl       one row per finished eval: step, tag, metrics or error

One eval at a time: a checkpoint that comes while the previous eval still runs is skipped
(logged). The eval reads the tag dir, which `checkpoint.keep` may delete under it; it then
fails, and the failure is logged and recorded, never raised into training. The Hugging Face
copy it converted (ROOT/hf-cache/<tag>) is removed once its checkpoint has been rotated away.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_ext.log import get_logger
from megatron_ext.training import checkpointing
from megatron_ext.training.config import EvalConfig

log = get_logger(__name__)

# The trainer's process-group environment: the eval is a single process of its own, and
# lm-eval (through accelerate) would otherwise try to join the trainer's process group.
_DIST_ENV = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE",
)  # fmt: skip


def eval_command(cfg: EvalConfig, tag_dir: Path, output: Path) -> list[str]:
    """`megatron-ext eval` on one checkpoint tag dir, writing lm-eval's JSON to `output`."""
    cmd = [sys.executable, "-m", "megatron_ext", "eval", "--checkpoint", str(tag_dir)]
    cmd += ["--tasks", cfg.tasks, "--tokenizer", str(cfg.tokenizer), "--output", str(output)]
    cmd += ["--batch-size", str(cfg.batch_size)]
    for flag, value in (
        ("--limit", cfg.limit),
        ("--task-dir", cfg.task_dir),
        ("--include-path", cfg.include_path),
        ("--num-fewshot", cfg.num_fewshot),
        ("--device", cfg.device),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


def summary_row(step: int, tag: str, returncode: int, result_path: Path, log_path: Path) -> dict:
    """{"step", "tag", "metrics": {"task/metric": value}} or {"step", "tag", "error"}."""
    from megatron_ext.errors import UserError
    from megatron_ext.eval.harness import metric_rows, read_results

    row: dict = {"step": step, "tag": tag}
    if returncode != 0:
        row["error"] = f"megatron-ext eval exited with {returncode}; see {log_path}"
        return row
    try:
        rows = metric_rows(read_results(result_path))
    except UserError as exc:
        row["error"] = str(exc)
        return row
    row["metrics"] = {f"{task}/{metric}": value for (task, metric), (value, _) in rows.items()}
    return row


class InLoopEval:
    """Starts, tracks and reaps the background evals of one training run (rank 0 only)."""

    def __init__(
        self, cfg: EvalConfig, root: str | Path, is_rank0: bool, max_wait_s: float | None = None
    ) -> None:
        """`max_wait_s`: a cap on the wait at the end (the other ranks wait in a barrier)."""
        self.cfg = cfg
        self.max_wait_s = max_wait_s
        self.root = Path(root)
        self.enabled = is_rank0 and cfg.every_checkpoints > 0
        self.num_saves = 0
        self.proc: subprocess.Popen | None = None
        self.running: tuple[int, str] | None = None  # (step, tag) of self.proc
        self._log_file = None

    @property
    def out_dir(self) -> Path:
        return self.root / "eval"

    def after_save(self, step: int) -> None:
        """Call after each successful checkpoint save at `step`; never raises into training."""
        if not self.enabled:
            return
        self.num_saves += 1
        self.poll()
        if self.num_saves % self.cfg.every_checkpoints:
            return
        tag = checkpointing.tag_of(step)
        if self.proc is not None:
            log.info(
                "in-loop eval: skipping %s, the eval of %s is still running", tag, self.running[1]
            )
            return
        try:
            self._start(step, tag)
        except OSError as exc:
            log.warning("in-loop eval: could not start the eval of %s: %s", tag, exc)

    def _start(self, step: int, tag: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.out_dir / f"{tag}.log"
        cmd = eval_command(self.cfg, self.root / tag, self.out_dir / f"{tag}.json")
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        self._log_file = open(log_path, "w")  # noqa: SIM115 - open while the process runs
        # own session: a Ctrl-C or kill-switch meant for the trainer does not hit the eval
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.running = (step, tag)
        log.info("in-loop eval of %s started (pid %d), output in %s", tag, self.proc.pid, log_path)

    def poll(self) -> None:
        """Reap a finished eval: record its summary row, log the outcome."""
        if self.proc is None or self.proc.poll() is None:
            return
        step, tag = self.running
        returncode = self.proc.returncode
        self._log_file.close()
        self.proc, self.running, self._log_file = None, None, None
        row = summary_row(
            step, tag, returncode, self.out_dir / f"{tag}.json", self.out_dir / f"{tag}.log"
        )
        with open(self.out_dir / "summary.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if "error" in row:
            gone = "" if (self.root / tag).is_dir() else " (the checkpoint was rotated away)"
            log.warning("in-loop eval of %s failed%s: %s", tag, gone, row["error"])
        else:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in row["metrics"].items())
            log.info("in-loop eval of %s: %s", tag, shown)
        self._drop_rotated_conversions()

    def _drop_rotated_conversions(self) -> None:
        cache = self.root / "hf-cache"
        if not cache.is_dir():
            return
        kept = set(checkpointing.list_checkpoints(self.root))
        for converted in cache.glob("iter_*"):
            if converted.name not in kept:
                shutil.rmtree(converted, ignore_errors=True)

    def finish(self) -> None:
        """At the end of training: wait (bounded) for a running eval so its result is kept."""
        if self.proc is None:
            return
        tag, limit = self.running[1], self.cfg.wait_at_end_s
        if self.max_wait_s is not None:
            limit = min(limit, self.max_wait_s)
        log.info("in-loop eval: waiting up to %.0f s for the eval of %s", limit, tag)
        deadline = time.monotonic() + limit
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.proc.poll() is None:
            log.warning(
                "in-loop eval of %s still running after %.0f s (eval.wait_at_end_s, at most 80%% "
                "of train.collective_timeout_s); stopping it. Rerun it with: %s",
                tag,
                limit,
                " ".join(self.proc.args),
            )
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.poll()
