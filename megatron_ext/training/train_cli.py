"""`megatron-ext train --config RUN.yaml [section.key=value ...] [--nproc-per-node N] [--dry-run]`.

Under torchrun, the deepspeed launcher, `srun` or `mpirun` each process runs this command once;
with `--nproc-per-node N` the command spawns N local ranks itself (laptops and tests).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from megatron_ext.config import apply_overrides, dump_yaml, from_dict, read_yaml, to_dict
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.training.config import RunConfig

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run YAML (model, parallel, data, train, optim, checkpoint)")
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 parallel.tp=2"
    )
    p.add_argument("--nproc-per-node", type=int, default=None, help="spawn N local ranks")
    p.add_argument("--dry-run", action="store_true", help="print config, layout, memory; exit")
    p.add_argument(
        "--device-memory-gb",
        type=float,
        default=None,
        help="with --dry-run: memory of one rank's device on the machine the run will use "
        "(default: this machine's GPU, or its RAM shared by the ranks of this node)",
    )
    p.add_argument(
        "--filesystem-gb-s",
        type=float,
        default=None,
        help="with --dry-run: the checkpoint filesystem's write bandwidth for this job, for the "
        "expected save time (default 10 GB/s)",
    )
    p.add_argument(
        "--signal-margin-s",
        type=float,
        default=300,
        help="with --dry-run: seconds between Slurm's time-limit signal and the kill (the "
        "profile's signal_margin_s; default 300)",
    )
    p.add_argument(
        "--reset-progress",
        action="store_true",
        help="continued pretraining: load weights only (checkpoint.load), new schedule",
    )
    p.add_argument(
        "--start-over",
        action="store_true",
        help="when no checkpoint in checkpoint.dir loads, move them aside and start from step 1",
    )
    p.add_argument("--exit-duration-in-mins", type=float, default=None)
    p.add_argument("--kill-switch-file", default=None)
    # launchers' `--local_rank=N` (also in LOCAL_RANK): accepted and ignored
    p.add_argument(
        "--local_rank", "--local-rank", type=int, dest="_local_rank", help=argparse.SUPPRESS
    )


def resolve_config(args: argparse.Namespace) -> RunConfig:
    data = read_yaml(args.config) if args.config else {}
    apply_overrides(data, list(args.overrides))
    cfg = from_dict(RunConfig, data, where=args.config or "config")
    if args.reset_progress:
        cfg.checkpoint.reset_progress = True
    if args.start_over:
        cfg.checkpoint.start_over = True
    if args.exit_duration_in_mins is not None:
        cfg.train.exit_duration_in_mins = args.exit_duration_in_mins
    if args.kill_switch_file is not None:
        cfg.train.kill_switch_file = args.kill_switch_file
    cfg.validate()

    layers = cfg.model.num_layers
    if cfg.parallel.pp > layers:
        raise UserError(
            f"parallel.pp={cfg.parallel.pp} is more pipeline stages than the model's {layers} "
            "layers; choose parallel.pp <= model.num_layers"
        )
    return cfg


def dry_run_report(
    cfg: RunConfig,
    world_size: int,
    filesystem_gb_s: float | None = None,
    signal_margin_s: float = 300,
) -> dict:
    """Resolved config, layout, parameters per stage, a memory estimate and the checkpoint's
    size and save time (no processes)."""
    from megatron_ext.models.model import count_parameters
    from megatron_ext.planner import checkpoint_io
    from megatron_ext.planner.memory import Layout, estimate_stages
    from megatron_ext.training.pipeline import partition_report

    model = cfg.model
    dp = cfg.data_parallel_size(world_size)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    model.check_tp(tp)
    report = partition_report(model, pp, tp, cfg.parallel.partition_method)
    mode = cfg.train.activation_checkpointing
    recompute = {"none": "none", "selective": "selective"}.get(mode, "full")  # every k: ~full
    layout = Layout(
        tp, pp, dp, cfg.train.micro_batch_size, recompute, cfg.parallel.sequence_parallel
    )
    stages = estimate_stages(
        model, layout, cfg.data.seq_length, cfg.train.global_batch_size, cfg.train.precision
    )
    return {
        "config": to_dict(cfg),
        "layout": {
            "tp": tp,
            "pp": pp,
            "dp": dp,
            "world_size": world_size,
            "grad_accumulation_steps": cfg.grad_accumulation_steps(dp),
        },
        "parameters": count_parameters(model, tp)["num_parameters"],
        "stages": [
            {
                "stage": i,
                "layers": report.names[report.parts[i] : report.parts[i + 1]],
                "params_per_tp_rank": report.params[i],
                "memory_gb": round(stages[i].total / 2**30, 4),
            }
            for i in range(pp)
        ],
        "partition": report.format(),
        "checkpoint": checkpoint_io.save_report(
            checkpoint_io.checkpoint_bytes(model, tp, cfg.train.precision),
            filesystem_gb_s or checkpoint_io.DEFAULT_FILESYSTEM_GB_S,
            signal_margin_s,
            cfg.checkpoint.save_timeout_s,
        ),
    }


def machine_memory_per_rank(precision: str, ranks_per_node: int) -> tuple[float, str] | None:
    """(GiB one rank may use, what that is) when the run would use this machine's devices: the
    smallest GPU's memory; on a machine without GPUs, for an fp32 (CPU) run, the RAM divided
    among the node's ranks. None for a bf16/fp16 run seen from a machine without GPUs (a login
    node): its devices are elsewhere."""
    import psutil
    import torch

    if torch.cuda.is_available():
        sizes = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        smallest = min(sizes, key=lambda d: d.total_memory)
        return smallest.total_memory / 2**30, f"{smallest.name} memory"
    if precision != "fp32":
        return None
    total = psutil.virtual_memory().total / 2**30
    return total / max(1, ranks_per_node), f"{total:.1f} GiB RAM / {ranks_per_node} ranks"


def _check_fits(report: dict, device_memory_gb: float | None, ranks_per_node: int) -> None:
    """--dry-run refuses a layout whose memory estimate exceeds what one rank has."""
    if device_memory_gb is not None:
        have, what = device_memory_gb, "--device-memory-gb"
    else:
        precision = report["config"]["train"]["precision"]
        found = machine_memory_per_rank(precision, ranks_per_node)
        if found is None:
            report["device_memory_gb"] = None  # give --device-memory-gb to check
            return
        have, what = found
    worst = max(report["stages"], key=lambda st: st["memory_gb"])
    report["device_memory_gb"] = round(have, 2)
    if worst["memory_gb"] > have:
        raise UserError(
            f"pipeline stage {worst['stage']} needs about {worst['memory_gb']:.2f} GiB per rank "
            f"(estimate), more than the {have:.2f} GiB one rank has ({what}): lower "
            "data.seq_length or train.micro_batch_size, set train.activation_checkpointing, or "
            "raise parallel.tp / parallel.pp. For a run on another machine, give its device "
            "memory with --device-memory-gb (or see `megatron-ext plan`)"
        )


def run(args: argparse.Namespace) -> int:
    if not (args.dry_run or args.nproc_per_node):  # this process is a rank: see stopping.py
        from megatron_ext.training.stopping import install_early_handlers

        install_early_handlers()
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise UserError(f"--nproc-per-node {args.nproc_per_node}: give at least 1 process")
    cfg = resolve_config(args)
    if args.dry_run:
        world = (
            args.nproc_per_node
            or int(os.environ.get("WORLD_SIZE", "0"))
            or (cfg.parallel.tp * cfg.parallel.pp)
        )
        # DeepSpeed's logger writes to stdout, created on first import: keep stdout the report
        with contextlib.redirect_stdout(sys.stderr):
            report = dry_run_report(cfg, world, args.filesystem_gb_s, args.signal_margin_s)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or args.nproc_per_node or world
        _check_fits(report, args.device_memory_gb, local)
        print(dump_yaml(cfg), end="")
        print(report["partition"])
        print(
            json.dumps(
                {k: v for k, v in report.items() if k not in ("config", "partition")}, indent=2
            )
        )
        for warning in report["checkpoint"]["warnings"]:
            log.warning("%s", warning)
        return 0
    if args.nproc_per_node:
        from megatron_ext.training.ranks import spawn_local

        argv = ["train", *(["--config", args.config] if args.config else []), *args.overrides]
        if args.reset_progress:
            argv.append("--reset-progress")
        if args.start_over:
            argv.append("--start-over")
        if args.exit_duration_in_mins is not None:
            argv += ["--exit-duration-in-mins", str(args.exit_duration_in_mins)]
        if args.kill_switch_file:
            argv += ["--kill-switch-file", args.kill_switch_file]
        return spawn_local(args.nproc_per_node, argv)
    return train_here(cfg)


def train_here(cfg: RunConfig) -> int:
    """This process is one rank of the run (the launcher set the environment)."""
    from megatron_ext.training import engine as engine_mod
    from megatron_ext.training.preflight import PreflightError
    from megatron_ext.training.ranks import export_dist_env
    from megatron_ext.training.spikes import LossSpikeError
    from megatron_ext.training.stopping import StopConditions
    from megatron_ext.training.trainer import CollectiveError, NonFiniteLossError, train

    stop = StopConditions(cfg.train.exit_duration_in_mins, cfg.train.kill_switch_file)
    stop.install()  # before the process group, the engine and loading: start-up is covered
    export_dist_env()
    engine_mod.init_distributed(cfg.train.collective_timeout_s)
    try:
        result = train(cfg, stop)
    except (NonFiniteLossError, LossSpikeError) as exc:
        log.error("%s", exc)
        engine_mod.shutdown()
        return 3
    except PreflightError as exc:
        log.error("%s", exc)
        engine_mod.shutdown()
        return 5
    except CollectiveError as exc:
        # no shutdown(): its barrier would wait for the rank that is stuck or gone
        log.error("%s", exc)
        return 4
    engine_mod.shutdown()
    if result["stopped"]:
        log.info("exited cleanly after step %d: %s", result["iteration"], result["stopped"])
    return 0
