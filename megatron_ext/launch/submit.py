"""Submit a rendered job, alone or as a chain of links that resume one another.

- one job: `sbatch job.sbatch`; the script requeues itself after a save on the time-limit signal
  when the profile allows it (`requeue: true`);
- `--chain K`: K jobs, link i+1 depends on link i with `afterany` (it starts however link i
  ended: time limit, crash, scancel of that link). Requeue is off: the next link takes over.
- `--chain K --chain-mode array`: one array job `--array=1-K%1` (one element at a time), as
  BLOOM's NVIDIA jobs did.
Every link resumes from `<checkpoint.dir>/latest`; once the target iteration is reached the
remaining links exit at once (see the top of the rendered script). Each submission is recorded in
`<run dir>/jobs.jsonl`, which `megatron-ext slurm status` reads.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.launch.job import Job
from megatron_ext.launch.render import write_job

CHAIN_MODES = ("dependency", "array")
Runner = Callable[[Sequence[str]], str]


def sbatch_runner(argv: Sequence[str]) -> str:
    """Run a Slurm client command; its stdout, or a UserError that says what went wrong."""
    if shutil.which(argv[0]) is None:
        raise UserError(
            f"{argv[0]} not found: run this on a Slurm login node (or start the test cluster: "
            "bash slurm/local/cluster.sh up)"
        )
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UserError(
            f"`{' '.join(argv)}` failed (exit {proc.returncode}): {proc.stderr.strip()}; check "
            "--account/--partition and that SLURM_CONF points at the cluster"
        )
    return proc.stdout


def _job_id(stdout: str) -> str:
    # --parsable prints "ID" or "ID;CLUSTER"
    return stdout.strip().split(";")[0]


def submit_job(
    job: Job,
    chain: int = 1,
    chain_mode: str = "dependency",
    sbatch_args: Sequence[str] = (),
    run: Runner = sbatch_runner,
) -> list[str]:
    """Write the job into its run directory and queue it; returns the job ids (array: one)."""
    if chain < 1:
        raise UserError(f"--chain {chain}: give the number of links, 1 or more")
    if chain_mode not in CHAIN_MODES:
        raise UserError(f"--chain-mode {chain_mode}: use one of {', '.join(CHAIN_MODES)}")
    paths = write_job(job)
    script = str(paths["script"])
    base = ["sbatch", "--parsable", *sbatch_args]
    ids: list[str] = []
    records = []
    try:
        if chain > 1 and chain_mode == "array":
            ids.append(_job_id(run([*base, f"--array=1-{chain}%1", script])))
            records.append({"job_id": ids[0], "mode": "array", "links": chain})
        else:
            for link in range(1, chain + 1):
                dep = [f"--dependency=afterany:{ids[-1]}"] if ids else []
                ids.append(_job_id(run([*base, *dep, script])))
                records.append({"job_id": ids[-1], "mode": "chain", "link": link, "links": chain})
    except UserError:
        if ids:  # no half-submitted chains: cancel the links already queued
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        raise
    now = time.time()
    with open(job.run_dir / "jobs.jsonl", "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps({"submitted": now, "script": script, **rec}) + "\n")
    return ids


def read_jobs(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "jobs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
