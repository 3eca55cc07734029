"""Where a run stands: its jobs, iteration, last checkpoint, last loss and tokens/s.

Reads the run directory written by `megatron-ext slurm submit` (`run.json`, `jobs.jsonl`, and
`events.jsonl` appended by the job script at each start and end), the trainer's
`<checkpoint.dir>/latest` and `metrics.jsonl`, and asks Slurm about the jobs: `squeue` for queued
and running ones, then `sacct` where accounting exists, else `scontrol show job` (which knows a
finished job for MinJobAge, 300 s by default).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.launch.submit import read_jobs

Query = Callable[[Sequence[str]], str | None]


def slurm_query(argv: Sequence[str]) -> str | None:
    """stdout of a Slurm client command, or None when it is missing or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, str | None]:
    """(iteration, name) of the checkpoint `latest` names; (0, None) before the first save."""
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return 0, None
    name = latest.read_text(encoding="utf-8").strip()
    digits = re.sub(r"\D", "", name)
    return (int(digits) if digits else 0), name


def last_metrics(path: Path, tail_bytes: int = 65536) -> dict | None:
    """The last complete JSON line of metrics.jsonl, reading only the file's tail."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - tail_bytes))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written, or cut by the tail window
    return None


def job_states(ids: Sequence[str], query: Query = slurm_query) -> dict[str, dict]:
    """job id (array elements as ID_TASK) -> {"state", "elapsed", "reason"}."""
    states: dict[str, dict] = {}
    wanted = set(ids)
    out = query(["squeue", "-h", "-a", "-o", "%A|%F|%K|%T|%M|%R"]) or ""
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        job_id, array_id, task, state, elapsed, reason = parts
        if job_id in wanted or array_id in wanted:
            key = f"{array_id}_{task}" if task not in ("N/A", "") else job_id
            states[key] = {"state": state, "elapsed": elapsed, "reason": reason}
    for job_id in ids:
        if any(k == job_id or k.startswith(f"{job_id}_") for k in states):
            continue
        states.update(_finished(job_id, query))
    return states


def _finished(job_id: str, query: Query) -> dict[str, dict]:
    acct = query(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,Elapsed,ExitCode"])
    if acct:
        out = {}
        for line in acct.splitlines():
            jid, state, elapsed, code = (line.split("|") + ["", "", "", ""])[:4]
            out[jid] = {"state": state, "elapsed": elapsed, "reason": f"exit {code}"}
        if out:
            return out
    show = query(["scontrol", "show", "job", "-o", job_id])
    out = {}
    for line in (show or "").splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobState" not in fields:
            continue
        key = fields.get("JobId", job_id)
        if fields.get("ArrayTaskId"):
            key = f"{fields.get('ArrayJobId', job_id)}_{fields['ArrayTaskId']}"
        out[key] = {
            "state": fields["JobState"],
            "elapsed": fields.get("RunTime", ""),
            "reason": f"exit {fields.get('ExitCode', '?')}",
        }
    return out or {
        job_id: {"state": "UNKNOWN (no longer known to Slurm)", "elapsed": "", "reason": ""}
    }


def run_status(run_dir: str | Path, query: Query = slurm_query) -> dict:
    run_dir = Path(run_dir).resolve()
    meta_path = run_dir / "run.json"
    if not meta_path.is_file():
        raise UserError(
            f"{meta_path} not found: give the run directory that `megatron-ext slurm submit` or "
            "`slurm render -o DIR/job.sbatch` wrote"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    ckpt_dir = Path(meta["checkpoint_dir"])
    iteration, name = latest_checkpoint(ckpt_dir)
    target = int(meta["target_iterations"])
    metrics = last_metrics(ckpt_dir / "metrics.jsonl")
    jobs = read_jobs(run_dir)
    ids = [j["job_id"] for j in jobs]
    events = _events(run_dir / "events.jsonl")
    return {
        "run_dir": str(run_dir),
        "profile": meta.get("profile"),
        "nodes": meta.get("nodes"),
        "layout": meta.get("layout"),
        "iteration": iteration,
        "target_iterations": target,
        "finished": iteration >= target,
        "last_checkpoint": str(ckpt_dir / name) if name else None,
        "last_step": metrics.get("step") if metrics else None,
        "last_loss": metrics.get("loss") if metrics else None,
        "tokens_per_s": metrics.get("tokens_per_s") if metrics else None,
        "jobs": jobs,
        "job_states": job_states(ids, query) if ids else {},
        "job_starts": sum(1 for e in events if e.get("event") == "start"),
        "events": events,
    }


def _events(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _event_key(event: dict) -> str:
    if event.get("array_job"):
        return f"{event['array_job']}_{event.get('array_task')}"
    return str(event.get("job_id"))


def format_status(st: dict) -> str:
    pct = 100.0 * st["iteration"] / max(1, st["target_iterations"])
    layout = st.get("layout") or {}
    lines = [
        f"run {st['run_dir']}: profile {st['profile']}, {st['nodes']} node(s), "
        f"tp={layout.get('tp')} pp={layout.get('pp')} dp={layout.get('dp')}",
        f"iteration {st['iteration']} / {st['target_iterations']} ({pct:.0f}%)"
        + (" - finished" if st["finished"] else ""),
        f"last checkpoint: {st['last_checkpoint'] or 'none yet'}",
    ]
    if st["last_loss"] is not None:
        tps = st["tokens_per_s"]
        lines.append(
            f"last loss: {st['last_loss']:.4f} at step {st['last_step']}"
            + (f"; {tps:,.0f} tokens/s" if tps else "")
        )
    lines.append(f"jobs ({st['job_starts']} start(s) recorded):")
    for key, s in sorted(st["job_states"].items()):
        ends = [e for e in st["events"] if _event_key(e) == key]
        last = f", last at iteration {ends[-1]['iteration']}" if ends else ""
        lines.append(f"  {key:>12}  {s['state']:<12} {s['elapsed']:>10}  {s['reason']}{last}")
    return "\n".join(lines)
