"""`megatron-ext rehearse`: a run at its real world size, walked rank by rank in one process.

For each rank of --world-size N the rehearsal joins torch's fake process group as that rank
(no communication: collectives return at once) and runs the trainer's own start-up code:
DeepSpeed's pipeline grid and our ParallelContext over it (engine.build_stage), the parameter-
balanced layer partition, and the rank's pipeline stage built on the meta device (nothing
allocated: a 176B stage costs nothing). Stages are built once per (pipeline stage, TP rank):
data-parallel replicas are the same stage. From what every rank built it derives the files a
checkpoint save writes (names from DeepSpeed's own naming for that rank, sizes from the
parameters), the universal-checkpoint rule of every parameter, and the memory per device (the
planner's estimate per stage), and checks:

- groups: each TP / PP / DP group is the same list on every member, of the configured size;
  a TP group inside one node (tasks per node of the profile);
- partition: the stages cover every layer once, and DeepSpeed's cut is the one `--dry-run` and
  `plan` print (pipeline.partition_report);
- tied embeddings: the first and the last stage of every (dp, tp) hold the tied module, and
  their tied group is exactly those two ranks;
- checkpoint files: no two ranks write the same file; every layer is written at every TP rank;
- universal checkpoints: each TP-split parameter matches the merge rule its split needs
  (row-parallel pattern for dim-1 splits, none of the replicated patterns), each TP-duplicated
  one a replicated pattern, no pattern matches nothing;
- memory: each stage's estimate within the budget (the profile's or --device-memory-gb, times
  --memory-fraction).

Anything inconsistent is listed and the command exits 1; `--json` prints the per-rank table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

from megatron_ext.config import apply_overrides, from_dict, read_yaml
from megatron_ext.errors import UserError

GiB = 2**30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="the run YAML (as for `train`)")
    p.add_argument("--world-size", type=int, required=True, help="ranks of the real run")
    p.add_argument("--profile", default=None, help="Slurm profile: tasks per node and memory")
    p.add_argument("--device-memory-gb", type=float, default=None, help="memory per device")
    p.add_argument("--memory-fraction", type=float, default=0.9, help="usable share (0.9)")
    p.add_argument("--json", action="store_true", help="print the per-rank table as JSON")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4")


@dataclass
class StageBuild:
    """What one (pipeline stage, TP rank) built: the same on every DP replica."""

    layers: tuple[int, int]  # [start, end) of the global layer indices
    params: int
    layer_bytes: dict[int, int]  # global layer index -> bytes of its saved state at this TP rank
    tied: dict[str, list[int]]  # tied key -> the ranks of its tied group
    param_tags: dict[str, tuple[bool, int | None]]  # name -> (split over TP, split dim)


@dataclass
class Rehearsal:
    world: int
    tp: int
    pp: int
    dp: int
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)
        elif len(self.problems) == 50:
            self.problems.append("... (more problems not listed)")


def load_config(path: str, overrides: list[str]):
    from megatron_ext.training.config import RunConfig

    data = read_yaml(path)
    apply_overrides(data, list(overrides))
    data.setdefault("data", {})
    if not data["data"].get("path") and not data["data"].get("blend"):
        data["data"]["path"] = "rehearsal"  # no data is read
    data.setdefault("checkpoint", {})
    data["checkpoint"]["dir"] = data["checkpoint"].get("dir") or "rehearsal"  # nothing written
    cfg = from_dict(RunConfig, data, where=path)
    cfg.validate()
    return cfg


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs its whole topology (every rank's coordinates) on each grid it builds, and
    its logger writes to the stdout of import time: to stderr here (stdout is the report)."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    streams = [(h, h.setStream(sys.stderr)) for h in logger.handlers
               if isinstance(h, logging.StreamHandler)]  # fmt: skip
    try:
        yield
    finally:
        logger.setLevel(level)
        for handler, stream in streams:
            handler.setStream(stream)


@contextlib.contextmanager
def fake_rank(rank: int, world: int, tasks_per_node: int):
    """This process as RANK of WORLD in torch's fake process group (and DeepSpeed's comm), with
    the launcher's environment of that rank."""
    import deepspeed
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    env = {"RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_RANK": str(rank % tasks_per_node)}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _state_bytes(layer, dtype_bytes: int) -> int:
    return sum(t.numel() * dtype_bytes for t in layer.state_dict().values())


def _build(cfg, grid_only: bool):
    """(grid, ctx, StageBuild or None) of the current fake rank."""
    from megatron_ext.training import engine

    model = cfg.model
    if grid_only:
        _, grid, ctx = engine.build_grid(cfg)
        return grid, ctx, None
    with engine.keeping_meta():
        _, grid, ctx, module, _, dtype = engine.build_stage(cfg, model, device="meta")
    nbytes = {"fp32": 4, "bf16": 2, "fp16": 2}[cfg.train.precision]
    start = int(module._local_start)
    layer_bytes = {}
    for i, layer in enumerate(module.forward_funcs):
        if hasattr(layer, "state_dict"):
            layer_bytes[start + i] = _state_bytes(layer, nbytes)
    tied = {key: list(comm["ranks"]) for key, comm in module.tied_comms.items()}
    tags = {}
    for name, p in module.named_parameters():
        split = bool(getattr(p, "tensor_parallel", False))
        dim = getattr(p, "partition_dim", None)
        tags[name] = (split, None if dim is None else int(dim))
    params = int(sum(p.numel() for p in module.parameters()))
    build = StageBuild((start, start + len(module.forward_funcs)), params, layer_bytes, tied, tags)
    return grid, ctx, build, [int(x) for x in module.parts]


def rehearse(cfg, world: int, tasks_per_node: int, budget_bytes: int | None) -> Rehearsal:
    import torch.distributed as dist

    from megatron_ext.checkpoint_format import universal_info
    from megatron_ext.planner.memory import Layout, estimate_stages
    from megatron_ext.training.pipeline import partition_report

    started = time.monotonic()
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = cfg.data_parallel_size(world)
    cfg.model.check_tp(tp)
    out = Rehearsal(world, tp, pp, dp)
    stages: dict[tuple[int, int], StageBuild] = {}
    groups: dict[str, dict[int, tuple[int, ...]]] = defaultdict(dict)
    ds_parts = None
    files: dict[str, int] = {}  # file name -> the rank writing it
    layer_written: dict[tuple[int, int], int] = {}  # (layer, tp rank) -> writer
    bf16 = cfg.train.precision == "bf16"
    # DeepSpeed prints its topology and partition on rank 0: to stderr, stdout stays ours
    with contextlib.redirect_stdout(sys.stderr), _quiet_deepspeed():
        for rank in range(world):
            with fake_rank(rank, world, tasks_per_node):
                # the stage of (pp, tp) is built on its dp-0 rank, the others build the grid
                first = _is_dp0(rank, tp, dp)
                built = _build(cfg, grid_only=not first)
                grid, ctx = built[0], built[1]
                for kind in ("tp", "pp", "dp"):
                    group = getattr(ctx, f"{kind}_group")
                    members = getattr(ctx, f"{kind}_ranks")
                    if group is not None:
                        members = dist.get_process_group_ranks(group)
                    groups[kind][rank] = tuple(sorted(members))
                key = (ctx.pp_rank, ctx.tp_rank)
                if first:
                    stages[key] = built[2]
                    if ds_parts is None:
                        ds_parts = built[3]
                    elif built[3] != ds_parts:
                        out.problem(f"rank {rank}: DeepSpeed cut {built[3]}, rank 0 {ds_parts}")
                stage = stages.get(key)
                if stage is None:
                    out.problem(f"rank {rank}: no dp-0 rank built stage {key}")
                    continue
                mp_rank = grid.get_model_parallel_rank() if pp * tp > 1 else 0
                dp_rank = grid.get_data_parallel_rank()
                names = {
                    f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}"
                    "_optim_states.pt": _optim_bytes(stage.params, dp),
                    f"rng_rank{rank}.pt": 0,
                }
                # DeepSpeed (checkpoint_parallel_write_pipeline false, as we configure it):
                # data-parallel rank 0 writes the model files
                if dp_rank == 0:
                    names[f"mp_rank_{mp_rank:02d}_model_states.pt"] = 0
                    for layer, nbytes in stage.layer_bytes.items():
                        names[f"layer_{layer:02d}-model_{ctx.tp_rank:02d}-model_states.pt"] = nbytes
                        if (layer, ctx.tp_rank) in layer_written:
                            out.problem(f"layer {layer} at tp rank {ctx.tp_rank} written twice")
                        layer_written[(layer, ctx.tp_rank)] = rank
                for name in names:
                    if name in files:
                        out.problem(f"{name}: written by rank {files[name]} and rank {rank}")
                    files[name] = rank
                out.rows.append({
                    "rank": rank,
                    "node": rank // tasks_per_node,
                    "pp": ctx.pp_rank,
                    "dp": ctx.dp_rank,
                    "tp": ctx.tp_rank,
                    "layers": list(stage.layers),
                    "params": stage.params,
                    "files": sorted(names.items()),
                })  # fmt: skip
    _check_groups(out, groups, tasks_per_node)
    predicted = partition_report(cfg.model, pp, tp, cfg.parallel.partition_method)
    if ds_parts is not None and list(predicted.parts) != ds_parts:
        out.problem(
            f"DeepSpeed cut the layers at {ds_parts}, `--dry-run`/`plan` predict "
            f"{list(predicted.parts)}"
        )
    all_layers = set(range(len(predicted.names)))
    for t in range(tp):
        written = {layer for (layer, tr) in layer_written if tr == t}
        with_state = {layer for s in stages.values() for layer in s.layer_bytes}
        if written != (with_state & all_layers):
            missing = sorted((with_state & all_layers) - written)
            out.problem(f"tp rank {t}: layers {missing[:10]} have no checkpoint file")
    _check_tied(out, stages, cfg, tp, dp)
    _check_universal(out, stages, universal_info(cfg.model), cfg.model.activation == "swiglu")
    mode = cfg.train.activation_checkpointing
    recompute = {"none": "none", "selective": "selective"}.get(mode, "full")
    layout = Layout(tp, pp, dp, cfg.train.micro_batch_size, recompute,
                    cfg.parallel.sequence_parallel)  # fmt: skip
    estimates = estimate_stages(cfg.model, layout, cfg.data.seq_length,
                                cfg.train.global_batch_size, cfg.train.precision)  # fmt: skip
    for s in range(pp):
        build = stages.get((s, 0))
        total = estimates[s].total
        row = {"stage": s, "layers": list(build.layers) if build else None,
               "params_per_tp_rank": build.params if build else None,
               "memory_gib": round(total / GiB, 2)}  # fmt: skip
        out.stages.append(row)
        if budget_bytes is not None and total > budget_bytes:
            out.problem(
                f"pipeline stage {s} needs about {total / GiB:.1f} GiB per device, over the "
                f"budget of {budget_bytes / GiB:.1f} GiB"
            )
    for row in out.rows:
        row["memory_gib"] = out.stages[row["pp"]]["memory_gib"]
    out.seconds = time.monotonic() - started
    return out


def _is_dp0(rank: int, tp: int, dp: int) -> bool:
    """rank = (pp * dp + dp_rank) * tp + tp_rank (DeepSpeed's pipe-data-model order)."""
    return (rank // tp) % dp == 0


def _optim_bytes(stage_params: int, dp: int) -> int:
    """ZeRO-1 shard of one rank: fp32 master + Adam's two moments of 1/dp of the stage."""
    return -(-stage_params // dp) * 12


def _check_groups(out: Rehearsal, groups, tasks_per_node: int) -> None:
    sizes = {"tp": out.tp, "pp": out.pp, "dp": out.dp}
    for kind, by_rank in groups.items():
        for rank, members in by_rank.items():
            if rank not in members or len(members) != sizes[kind]:
                out.problem(f"rank {rank}: {kind} group {list(members)[:8]} (size {sizes[kind]})")
                continue
            for other in members:
                if by_rank.get(other) != members:
                    out.problem(f"{kind} group of rank {rank} differs on member {other}")
                    break
            if kind == "tp" and len({m // tasks_per_node for m in members}) > 1:
                out.problem(f"the tp group of rank {rank} {list(members)} spans nodes")


def _check_tied(out: Rehearsal, stages, cfg, tp: int, dp: int) -> None:
    if not cfg.model.tied_embeddings or out.pp == 1:
        return
    from megatron_ext.parallel.context import RankCoord, global_rank_of

    for t in range(tp):
        first, last = stages.get((0, t)), stages.get((out.pp - 1, t))
        if first is None or last is None:
            continue
        if first.tied.keys() != last.tied.keys() or not first.tied:
            out.problem(f"tp rank {t}: the first and last stage hold tied modules "
                        f"{sorted(first.tied)} and {sorted(last.tied)}")  # fmt: skip
            continue
        for key, ranks in first.tied.items():
            want = sorted(global_rank_of(RankCoord(s, 0, t), tp, dp) for s in (0, out.pp - 1))
            if sorted(ranks) != want or sorted(last.tied[key]) != want:
                out.problem(f"tied module {key!r} at tp rank {t}: group {ranks}, want {want}")


def _check_universal(out: Rehearsal, stages, info: dict, swiglu: bool) -> None:
    from deepspeed.checkpoint import constants as c

    replicated = [re.compile(p) for p in info[c.TP_REPLICATED_PARAMETER_PATTERNS]]
    rows = [re.compile(p) for p in info[c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS]]
    vocab = [re.compile(p) for p in info[c.VOCABULARY_PARAMETER_PATTERNS]]
    # SwiGLU: each TP shard of linear_fc1 is [gate_r; up_r], merged as two sub-parameters
    halves = [re.compile(p) for p in info.get("parameter_with_2_sub_params_cat_dim_0", [])]
    used = set()
    seen = set()
    for build in stages.values():
        for name, (split, dim) in build.param_tags.items():
            if name in seen:
                continue
            seen.add(name)
            rep = [p.pattern for p in replicated if p.match(name)]
            row = [p.pattern for p in rows if p.match(name)]
            half = [p.pattern for p in halves if p.match(name)]
            used.update(rep + row + half + [p.pattern for p in vocab if p.match(name)])
            if swiglu and name.endswith("linear_fc1.weight") and split and not half:
                out.problem(f"{name}: SwiGLU's [gate; up] shards but no 2-sub-parameter pattern "
                            "matches it: the universal merge would interleave gate and up")  # fmt: skip
            if split and rep:
                out.problem(f"{name}: split over TP but matches the replicated pattern {rep[0]}")
            elif split and dim == 1 and not row:
                out.problem(f"{name}: split along dim 1 (row-parallel) but no row-parallel "
                            "pattern matches it: the universal merge would cat along dim 0")  # fmt: skip
            elif split and dim == 0 and row:
                out.problem(f"{name}: split along dim 0 but matches the row pattern {row[0]}")
            elif not split and not rep and out.tp > 1:
                out.problem(f"{name}: the same on every TP rank but no replicated pattern "
                            "matches it: the universal merge would concatenate the copies")  # fmt: skip
    for pattern in [p.pattern for p in replicated + rows + vocab + halves]:
        if pattern not in used:
            out.problem(f"universal pattern {pattern} matches no parameter")


def summary(r: Rehearsal, cfg) -> str:
    files = defaultdict(int)
    per_rank = []
    for row in r.rows:
        nbytes = sum(b for _, b in row["files"])
        per_rank.append(nbytes)
        files["count"] += len(row["files"])
    lines = [
        f"rehearsal of {r.world} ranks: tp={r.tp} pp={r.pp} dp={r.dp}, "
        f"{cfg.train.precision}, in {r.seconds:.1f} s",
        "  stage  layers      params/TP rank   memory GiB",
    ]
    for s in r.stages:
        layers = f"{s['layers'][0]}-{s['layers'][1] - 1}" if s["layers"] else "?"
        params = f"{s['params_per_tp_rank']:,}" if s["params_per_tp_rank"] else "?"
        lines.append(f"  {s['stage']:>5}  {layers:<10}  {params:>15}  {s['memory_gib']:>10.1f}")
    lines.append(
        f"  a checkpoint: {files['count']} files, {sum(per_rank) / 1e9:,.1f} GB; the most one "
        f"rank writes: {max(per_rank) / 1e9:,.2f} GB"
    )
    if r.problems:
        lines.append(f"{len(r.problems)} problem(s):")
        lines += [f"  - {p}" for p in r.problems]
    else:
        lines.append("consistent: groups, partition, tied embeddings, checkpoint files, "
                     "universal-checkpoint rules and memory")  # fmt: skip
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: give at least 1")
    cfg = load_config(args.config, args.overrides)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if args.world_size % (tp * pp):
        raise UserError(f"--world-size {args.world_size} is not a multiple of tp x pp = {tp * pp}")
    tasks_per_node, memory_gb = 8, args.device_memory_gb
    if args.profile:
        from megatron_ext.launch.profiles import load_profile

        profile = load_profile(args.profile)
        tasks_per_node = profile.tasks_per_node
        memory_gb = memory_gb or profile.device_memory_gb
    budget = None if memory_gb is None else int(memory_gb * args.memory_fraction * GiB)
    with contextlib.redirect_stdout(sys.stderr):  # what DeepSpeed prints on import and build
        result = rehearse(cfg, args.world_size, tasks_per_node, budget)
    if args.json:
        print(json.dumps({"problems": result.problems, "stages": result.stages,
                          "ranks": result.rows}, indent=None))  # fmt: skip
    else:
        print(summary(result, cfg))
    sys.stdout.flush()
    return 1 if result.problems else 0
