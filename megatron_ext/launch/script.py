"""The text of a job script (a `Job` from `launch.render.prepare_job` -> bash).

Layout of the script, top to bottom: `#SBATCH` header (a comment above each option says why),
variables of the run, the profile's modules and environment, rendezvous (MASTER_ADDR/PORT),
helpers and the early exit of a finished run, per-node set-up, the training step under srun, and
the decision after it (finished / failed / saved on the time-limit signal -> requeue).
"""

from __future__ import annotations

import shlex
import time

from megatron_ext.launch.job import Job
from megatron_ext.launch.profiles import Setting


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _comment(why: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in why.splitlines()] if why else []


def _directives(job: Job) -> list[tuple[str, str]]:
    """(option, why) pairs for the #SBATCH header."""
    p = job.profile
    logs = job.run_dir / "logs" if job.script_path else job.run_dir
    out = [
        (f"--job-name={job.job_name}", ""),
        (f"--nodes={job.nodes}", ""),
        (f"--ntasks-per-node={job.tasks_per_node}", "one task (rank) per device"),
    ]
    if job.gpus_per_node and p.gpu_directive == "gpus-per-node":
        out.append((f"--gpus-per-node={job.gpus_per_node}", f"all {p.device_name} devices"))
    elif job.gpus_per_node and p.gpu_directive == "gres":
        out.append((f"--gres=gpu:{job.gpus_per_node}", f"all {p.device_name} devices"))
    if p.cpus_per_task:
        out.append((f"--cpus-per-task={p.cpus_per_task}", "data-loader workers and host threads"))
    out.append((f"--time={job.time}", ""))
    if job.account:
        out.append((f"--account={job.account}", ""))
    if job.partition:
        out.append((f"--partition={job.partition}", ""))
    if job.exclude:
        out.append((f"--exclude={','.join(job.exclude)}", "nodes left out (--exclude)"))
    if job.signal_margin_s:
        out.append(
            (
                f"--signal=USR1@{job.signal_margin_s}",
                "USR1 to every task this many seconds before the time limit: the trainer saves a "
                "checkpoint and exits 0",
            )
        )
    out.append((f"--output={logs}/%x-%j.out", "one log per job id; stderr goes to the same file"))
    if job.requeue:
        out.append(("--requeue", "the script requeues itself after a save on the time limit"))
        out.append(("--open-mode=append", "a requeued job keeps its id: append to its log"))
    out.append(
        (
            f"--chdir={job.workdir}",
            "relative paths in the run config resolve as they did at render time",
        )
    )
    for s in p.sbatch:
        if s.value is True:
            out.append((f"--{s.name}", s.why))
        elif s.value not in (False, None):
            out.append((f"--{s.name}={s.value}", s.why))
    return out


def _export(s: Setting) -> list[str]:
    return _comment(s.why) + [f'export {s.name}="{s.value}"']


def render_script(job: Job) -> str:
    p = job.profile
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    lines = [
        "#!/bin/bash",
        f"# Rendered by `megatron-ext slurm render` on {now}. Re-render rather than edit.",
        f"# Profile: {p.name} ({p.path}){': ' + p.description if p.description else ''}",
        f"# Run config: {job.resolved_config_path}",
        f"# Layout: {job.nodes} node(s) x {job.tasks_per_node} tasks = {job.world_size} ranks; "
        f"tp={job.tp} pp={job.pp} -> dp={job.dp}",
    ]
    for opt, why in _directives(job):
        lines += _comment(why) + [f"#SBATCH {opt}"]
    lines += [
        "",
        "set -uo pipefail  # not -e: the exit code of srun decides what happens next",
        f"RUN_DIR={_q(job.run_dir)}",
        f"CKPT_DIR={_q(job.checkpoint_dir)}",
        f"TARGET_ITERS={job.iterations}",
        f"REQUEUE={int(job.requeue)}",
        f"MAX_REQUEUES={p.max_requeues}",
        "",
    ]
    lines += _environment(job)
    lines += _helpers()
    lines += _launch(job)
    lines += _after()
    return "\n".join(lines) + "\n"


def _environment(job: Job) -> list[str]:
    p = job.profile
    out = []
    if p.modules:
        out.append("# Software environment of the cluster")
        out += [f"module load {m}" for m in p.modules]
    for s in p.env:
        out += _export(s)
    out += [
        "# Rendezvous: rank 0 listens on the first host; the port follows the job id so jobs "
        "sharing a node do not collide",
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_ADDR",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export PYTHONUNBUFFERED=1",
        "",
    ]
    return out


def _helpers() -> list[str]:
    return [
        "# The newest good checkpoint's iteration (the trainer writes <checkpoint.dir>/latest)",
        "latest_iteration() {",
        '  local t=""',
        '  [ -f "$CKPT_DIR/latest" ] && t=$(tr -dc 0-9 < "$CKPT_DIR/latest")',
        "  echo $((10#${t:-0}))",
        "}",
        "event() {  # one JSON line per job start/end: `megatron-ext slurm status` reads them",
        '  printf \'{"time": %s, "job_id": "%s", "array_job": "%s", "array_task": "%s", '
        '"restart": %s, "event": "%s", "iteration": %s, "rc": %s}\\n\' "$(date +%s)" '
        '"$SLURM_JOB_ID" "${SLURM_ARRAY_JOB_ID:-}" "${SLURM_ARRAY_TASK_ID:-}" '
        '"${SLURM_RESTART_COUNT:-0}" "$1" "$2" "$3" >> "$RUN_DIR/events.jsonl"',
        "}",
        "",
        "# A finished run (or a STOP file) makes every later link of a chain exit at once",
        'if [ -e "$RUN_DIR/STOP" ]; then echo "$RUN_DIR/STOP exists: not training"; exit 0; fi',
        "START_ITER=$(latest_iteration)",
        'if [ "$START_ITER" -ge "$TARGET_ITERS" ]; then',
        '  echo "run already finished: iteration $START_ITER of $TARGET_ITERS"',
        '  event skip "$START_ITER" 0',
        "  exit 0",
        "fi",
        'event start "$START_ITER" null',
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: '
        'from iteration $START_ITER of $TARGET_ITERS"',
        "",
    ]


def _launch(job: Job) -> list[str]:
    p = job.profile
    out = []
    if p.node_setup:
        out.append("# Once per node, before training (one task per node)")
        body = "; ".join(str(s.value) for s in p.node_setup)
        for s in p.node_setup:
            out += _comment(f"{s.name}: {s.why}" if s.why else s.name)
        out.append(
            f"srun --ntasks-per-node=1 --ntasks=$SLURM_NNODES --cpus-per-task=1 bash -c '{body}'"
        )
        out.append("")
    srun = ["srun", "--kill-on-bad-exit=1"]
    out.append(
        "# --kill-on-bad-exit=1: a task that fails (e.g. a collective timed out on a stuck peer)"
    )
    out.append("# ends the step at once instead of leaving the other tasks waiting.")
    if job.launcher == "mpi":
        out.append("# MPI launch: PMIx wires the ranks so MPI_Init (mpi4py) works in every task")
        srun.append("--mpi=pmix")
    for s in p.srun:
        out += _comment(f"--{s.name}: {s.why}" if s.why else "")
        srun.append(_q(f"--{s.name}" if s.value is True else f"--{s.name}={s.value}"))
    if job.container:
        c = p.container
        out.append(
            f"# Every task runs in the container ({c.runtime} exec) with the profile's binds"
        )
        run = [c.runtime, "exec"] + (["--bind", ",".join(c.binds)] if c.binds else [])
        srun.append(" ".join(_q(a) for a in run + list(c.exec_args) + [job.container]))
    task_env = [
        "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS",
        "export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1} NODE_RANK=$SLURM_NODEID",
    ]
    for s in p.task_env:
        # Reasons go above srun: a quote in a comment would end the single-quoted task script.
        out += _comment(f"per task, {s.name}: {s.why}" if s.why else "")
        task_env.append(f'export {s.name}="{s.value}"')
    out += [
        "# The trainer. Each task exports torchrun-style rank variables, then execs it.",
        "TRAIN_CMD=(" + " ".join(_q(a) for a in job.train_argv) + ")",
        " \\\n  ".join(srun) + " \\",
        "  bash -c '",
        *[f"  {line}" for line in task_env],
        '  exec "$@"',
        '\' task "${TRAIN_CMD[@]}"',
        "rc=$?",
        "",
    ]
    return out


def _after() -> list[str]:
    return [
        "END_ITER=$(latest_iteration)",
        'event end "$END_ITER" "$rc"',
        'if [ "$END_ITER" -ge "$TARGET_ITERS" ]; then',
        '  echo "run finished: iteration $END_ITER"',
        "  exit 0",
        "fi",
        'if [ "$rc" -ne 0 ]; then echo "training failed (exit code $rc)"; exit "$rc"; fi',
        "# Exit 0 before the target: the trainer saved on the time-limit signal (or the signal",
        "# came during start-up, before a step: nothing new to save; MAX_REQUEUES bounds loops)",
        'if [ "$REQUEUE" = 1 ]; then',
        '  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then',
        '    echo "requeued $MAX_REQUEUES times already: stopping"',
        "    exit 1",
        "  fi",
        '  echo "stopped at iteration $END_ITER before the target: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit 0",
    ]
