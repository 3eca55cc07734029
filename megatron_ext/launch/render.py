"""Render a readable sbatch script from a cluster profile and a run config.

`prepare_job` checks everything that can be checked before a job is queued (divisibility of the
world by tp x pp, batch sizes, time limit against the signal margin, account, container) and
returns a `Job`; `render_script` (launch/script.py) turns it into text; `write_job` puts the
script, the resolved run config, `run.json` (what `slurm status` reads) and the `logs/`
directory into the run directory.

Rank wiring: the script exports MASTER_ADDR (first host of the allocation) and MASTER_PORT (from
the job id, so jobs sharing a node do not collide) in the batch shell, and each task exports
RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE / NODE_RANK from SLURM_PROCID / SLURM_LOCALID /
SLURM_NTASKS / SLURM_NTASKS_PER_NODE / SLURM_NODEID in a small `bash -c` wrapper before exec'ing
the trainer, so the trainer sees torchrun-style variables (`megatron_ext.parallel.rank_env` reads
either).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.launch.job import Job
from megatron_ext.launch.profiles import ClusterProfile
from megatron_ext.launch.run_config import (
    check_for_trainer,
    dump_config,
    load_run_config,
    run_shape,
)
from megatron_ext.launch.script import render_script


@dataclass
class RenderOptions:
    profile: ClusterProfile
    nodes: int
    config: Path
    overrides: list[str] = field(default_factory=list)
    time: str | None = None
    account: str | None = None
    partition: str | None = None
    container: str | None = None
    train_cmd: str | None = None
    tasks_per_node: int | None = None
    launcher: str | None = None
    job_name: str | None = None
    signal_margin_s: int | None = None
    output: Path | None = None  # None: print the script; the run dir is then run_dir or cwd
    run_dir: Path | None = None
    requeue: bool | None = None  # None: the profile's choice; chains and arrays pass False
    # nodes the job must not get (`--exclude`, each entry comma-separated; sick nodes that a
    # pre-flight check named)
    exclude: list[str] = field(default_factory=list)


_TIME = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})$")


def parse_time(text: str, where: str = "--time") -> int:
    """`HH:MM:SS` or `D-HH:MM:SS` -> seconds."""
    m = _TIME.match(text.strip())
    if not m:
        raise UserError(f"{where} '{text}': write HH:MM:SS or D-HH:MM:SS (e.g. 02:00:00)")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


# a host name (letters, digits, '-', '_', '.') with Slurm's numeric ranges allowed anywhere in
# it (nid[001234-001240]); nothing that a shell or sbatch would read as more than a name
_HOST = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]|\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\])*"
_HOST_LIST = re.compile(rf"{_HOST}(?:,{_HOST})*")


def parse_exclude(entries: list[str]) -> tuple[str, ...]:
    """`--exclude` values (each `host,host,...`; spaces around commas dropped) -> the host names
    and Slurm host ranges, in order, without repeats."""
    text = ",".join(re.sub(r"\s*,\s*", ",", e.strip()) for e in entries if e.strip())
    if not text:
        return ()
    if not _HOST_LIST.fullmatch(text):
        odd = sorted({c for c in text if not (c.isascii() and c.isalnum()) and c not in "-_.,[]"})
        why = (
            f"{odd!r} cannot be part of a host name"
            if odd
            else "an entry is empty, starts with neither a letter nor a digit, or has a [range] "
            "that is not numbers and dashes"
        )
        raise UserError(
            f"--exclude {text!r}: {why}; give host names separated by commas (letters, digits, "
            "'-', '_', '.', Slurm ranges such as nid[001234-001240]), e.g. "
            "--exclude nid001234,nid001240"
        )
    return tuple(dict.fromkeys(re.findall(_HOST, text)))


_NO_WHITESPACE = ("job_name", "account", "partition", "time")
_NO_CONTROL = ("config", "output", "run_dir", "container", "train_cmd", "launcher")


def _check_script_values(opts: RenderOptions) -> None:
    """Values that reach the script: a control character (a newline) would end the #SBATCH
    header and run the rest as a command; Slurm takes no whitespace in these names."""
    for name in (*_NO_WHITESPACE, *_NO_CONTROL):
        value = getattr(opts, name)
        if value is None:
            continue
        text = str(value)
        bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
        if name in _NO_WHITESPACE:
            bad += [c for c in text if c.isspace() and c not in bad]
        if bad:
            option = "--" + name.replace("_", "-")
            raise UserError(
                f"{option} {text!r}: contains {sorted(set(bad))!r}, which the job script cannot "
                "hold safely; use a value without control characters"
                + (" or whitespace" if name in _NO_WHITESPACE else "")
            )


def prepare_job(opts: RenderOptions) -> Job:
    """Check the combination and derive the job's shape; every refusal says what to change."""
    _check_script_values(opts)
    exclude = parse_exclude(opts.exclude)
    p = opts.profile
    if opts.nodes is None or opts.nodes < 1:
        raise UserError("--nodes N is required (N >= 1): how many nodes the job gets")
    if p.max_nodes is not None and opts.nodes > p.max_nodes:
        raise UserError(f"--nodes {opts.nodes} exceeds {p.path}: max_nodes={p.max_nodes}")
    tasks = opts.tasks_per_node or p.tasks_per_node
    allowed = p.allowed_tasks_per_node or (p.tasks_per_node,)
    if tasks not in allowed:
        raise UserError(
            f"--tasks-per-node {tasks}: profile {p.name} ({p.path}) allows "
            f"{', '.join(map(str, allowed))} (allowed_tasks_per_node)"
        )
    gpus = tasks * (p.gpus_per_node // p.tasks_per_node)

    cfg = load_run_config(opts.config, opts.overrides)
    workdir = Path.cwd().resolve()
    shape = run_shape(cfg, str(opts.config), base_dir=workdir)
    world = opts.nodes * tasks
    if world % (shape.tp * shape.pp):
        raise UserError(
            f"{opts.config}: {opts.nodes} node(s) x {tasks} tasks = {world} ranks is not divisible "
            f"by parallel.tp x parallel.pp = {shape.tp} x {shape.pp}; change --nodes or the layout "
            "(`megatron-ext plan` proposes one)"
        )
    dp = world // (shape.tp * shape.pp)
    if shape.global_batch_size % (shape.micro_batch_size * dp):
        raise UserError(
            f"{opts.config}: train.global_batch_size {shape.global_batch_size} is not a multiple "
            f"of train.micro_batch_size x dp = {shape.micro_batch_size} x {dp}; change one of them"
        )

    time_text = opts.time or p.time
    time_s = parse_time(time_text)
    if p.max_time and time_s > parse_time(p.max_time, f"{p.path}: max_time"):
        raise UserError(f"--time {time_text} exceeds the partition limit {p.max_time} ({p.path})")
    margin = p.signal_margin_s if opts.signal_margin_s is None else opts.signal_margin_s
    if margin and margin >= time_s:
        raise UserError(
            f"--time {time_text} leaves no training time before the save signal "
            f"{margin} s before the limit; ask for more time or pass --signal-margin"
        )
    account = opts.account
    if p.account_required and not account:
        raise UserError(f"profile {p.name} needs --account (your project, e.g. project_462000XXX)")
    container = opts.container or (p.container.image if p.container else None)
    if p.container and p.container.required and not container:
        raise UserError(f"profile {p.name} runs in a container: pass --container IMAGE.sif")
    if container and p.container is None:
        raise UserError(
            f"--container given but profile {p.name} ({p.path}) has no container: section "
            "(runtime, binds); add one"
        )
    launcher = opts.launcher or p.launcher
    if launcher not in ("torch", "mpi"):
        raise UserError(f"--launcher {launcher}: use torch or mpi")

    if opts.output is not None:
        script_path = Path(opts.output).resolve()
        run_dir = script_path.parent
        config_path = script_path.with_suffix(".config.yaml")
    else:
        script_path = None
        run_dir = (opts.run_dir or workdir).resolve()
        config_path = Path(opts.config).resolve()
    cfg.setdefault("checkpoint", {})["dir"] = shape.checkpoint_dir
    template = opts.train_cmd or p.train_cmd
    train_argv = _train_argv(template, config_path, opts.overrides if script_path is None else [])
    if _runs_our_trainer(train_argv):
        check_for_trainer(cfg, str(opts.config))
    requeue = p.requeue if opts.requeue is None else (opts.requeue and p.requeue)
    return Job(
        profile=p,
        nodes=opts.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        world_size=world,
        tp=shape.tp,
        pp=shape.pp,
        dp=dp,
        iterations=shape.iterations,
        checkpoint_dir=shape.checkpoint_dir,
        time=time_text,
        time_s=time_s,
        signal_margin_s=margin,
        account=account,
        partition=opts.partition or p.partition,
        container=container,
        launcher=launcher,
        requeue=requeue,
        job_name=opts.job_name or f"mx-{Path(opts.config).stem}",
        run_dir=run_dir,
        script_path=script_path,
        config_source=Path(opts.config).resolve(),
        resolved_config=cfg,
        resolved_config_path=config_path,
        train_argv=train_argv,
        workdir=workdir,
        exclude=exclude,
    )


def _train_argv(template: str, config_path: Path, overrides: list[str]) -> list[str]:
    argv = shlex.split(template)
    if not argv:
        raise UserError("--train-cmd / profile train_cmd is empty: give the command a task runs")
    if any("{config}" in a for a in argv):
        argv = [a.replace("{config}", str(config_path)) for a in argv]
    else:
        argv += ["--config", str(config_path)]
    return argv + list(overrides)


def _runs_our_trainer(argv: list[str]) -> bool:
    words = [Path(a).name for a in argv[:4]]
    return ("megatron-ext" in words or "megatron_ext" in words) and "train" in words


def write_job(job: Job) -> dict[str, Path]:
    """Write script, resolved config, run.json and logs/ into the run directory."""
    if job.script_path is None:
        raise ValueError("write_job needs RenderOptions.output")
    run_dir = job.run_dir
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    header = [
        f"Resolved from {job.config_source} by megatron-ext slurm render",
        f"profile {job.profile.name}, {job.nodes} node(s) x {job.tasks_per_node} tasks: "
        f"tp={job.tp} pp={job.pp} dp={job.dp}",
    ]
    job.resolved_config_path.write_text(dump_config(job.resolved_config, header), encoding="utf-8")
    job.script_path.write_text(render_script(job), encoding="utf-8")
    job.script_path.chmod(0o755)
    meta = {
        "script": str(job.script_path),
        "config": str(job.resolved_config_path),
        "checkpoint_dir": job.checkpoint_dir,
        "target_iterations": job.iterations,
        "profile": job.profile.name,
        "nodes": job.nodes,
        "tasks_per_node": job.tasks_per_node,
        "layout": {"tp": job.tp, "pp": job.pp, "dp": job.dp},
        "time": job.time,
        "requeue": job.requeue,
        "launcher": job.launcher,
    }
    (run_dir / "run.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return {"script": job.script_path, "config": job.resolved_config_path}
