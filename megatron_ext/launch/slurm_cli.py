"""`megatron-ext slurm render|submit|status`: job scripts from cluster profiles (thin CLI)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_ext.launch.profiles import available_profiles, load_profile
from megatron_ext.launch.render import RenderOptions, prepare_job, render_script, write_job
from megatron_ext.launch.status import format_status, run_status
from megatron_ext.launch.submit import CHAIN_MODES, submit_job


def _job_arguments(p: argparse.ArgumentParser, output_help: str) -> None:
    p.add_argument(
        "--profile",
        required=True,
        help=f"cluster profile: {', '.join(available_profiles())}, or a path to your YAML",
    )
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--config", required=True, type=Path, help="run config (RUN.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted run-config overrides")
    p.add_argument("--time", help="time limit HH:MM:SS (default: the profile's)")
    p.add_argument("--account", help="project/account to charge")
    p.add_argument("--partition", help="partition (default: the profile's)")
    p.add_argument("--container", help="container image (.sif) to run every task in")
    p.add_argument("--tasks-per-node", type=int, help="tasks (= devices) per node, if allowed")
    p.add_argument("--launcher", choices=("torch", "mpi"), help="torch (default) or mpi (pmix)")
    p.add_argument(
        "--train-cmd",
        help="command each task runs ({config} = the resolved config; default: the profile's "
        "train_cmd, `megatron-ext train --config {config}`)",
    )
    p.add_argument("--job-name", help="Slurm job name (default: mx-<config name>)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="HOST[,HOST...]",
        help="nodes the job must not get, e.g. nid001234,nid001240 or nid[001234-001240] "
        "(repeatable): the ones a failed pre-flight check named",
    )
    p.add_argument(
        "--signal-margin",
        type=int,
        dest="signal_margin_s",
        help="seconds before the time limit at which tasks get USR1 (0: none)",
    )
    p.add_argument("-o", "--output", type=Path, help=output_help)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="slurm_command", metavar="SUBCOMMAND", required=True)
    render = sub.add_parser("render", help="write an sbatch script for a run")
    _job_arguments(
        render,
        "script path; the resolved config (.config.yaml), run.json and logs/ go next to it "
        "(default: print the script)",
    )
    submit = sub.add_parser("submit", help="render and sbatch, optionally as a chain")
    _job_arguments(submit, "script path (default: runs/<config name>/job.sbatch)")
    submit.add_argument("--chain", type=int, default=1, help="number of links (default 1)")
    submit.add_argument(
        "--chain-mode",
        choices=CHAIN_MODES,
        default="dependency",
        help="dependency: K jobs with afterany; array: one array job --array=1-K%%1",
    )
    submit.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option")
    status = sub.add_parser("status", help="where a run stands")
    status.add_argument("run_dir", type=Path, help="run directory (holds run.json)")
    status.add_argument("--json", action="store_true", help="print JSON")


def _options(args: argparse.Namespace, requeue: bool | None = None) -> RenderOptions:
    return RenderOptions(
        profile=load_profile(args.profile),
        nodes=args.nodes,
        config=args.config,
        overrides=list(args.overrides),
        time=args.time,
        account=args.account,
        partition=args.partition,
        container=args.container,
        train_cmd=args.train_cmd,
        tasks_per_node=args.tasks_per_node,
        launcher=args.launcher,
        job_name=args.job_name,
        signal_margin_s=args.signal_margin_s,
        output=args.output,
        requeue=requeue,
        exclude=args.exclude,
    )


def run(args: argparse.Namespace) -> int:
    if args.slurm_command == "render":
        job = prepare_job(_options(args))
        if args.output is None:
            sys.stdout.write(render_script(job))
            return 0
        paths = write_job(job)
        print(f"wrote {paths['script']} and {paths['config']}")
        print(f"submit with: sbatch {paths['script']}")
        return 0
    if args.slurm_command == "submit":
        if args.output is None:
            args.output = Path("runs") / args.config.stem / "job.sbatch"
        # In a chain the next link takes over after a save; requeueing would run two at once.
        job = prepare_job(_options(args, requeue=False if args.chain > 1 else None))
        ids = submit_job(job, args.chain, args.chain_mode, args.sbatch_arg)
        print(f"submitted {', '.join(ids)} ({args.chain} link(s)); run dir {job.run_dir}")
        print(f"status: megatron-ext slurm status {job.run_dir}")
        return 0
    st = run_status(args.run_dir)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    return 0
