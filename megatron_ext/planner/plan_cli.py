"""`megatron-ext plan`: propose a parallel layout for a model on a cluster profile (thin CLI)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.launch.profiles import available_profiles, load_profile
from megatron_ext.planner.devices import DEVICES, device, links_for
from megatron_ext.planner.memory import PRECISIONS, GiB, total_params
from megatron_ext.planner.plan import RECOMPUTE, Candidate, PlanRequest, accepted, plan

TIE = 0.05  # predicted step times this close are not told apart (planner/throughput.py's error)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model preset (e.g. bloom-176b) or a YAML file")
    p.add_argument(
        "--profile",
        required=True,
        help=f"cluster profile: {', '.join(available_profiles())}, or a path to your YAML",
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--seq-length", type=int, help="default: the model's")
    p.add_argument("--global-batch", type=int, default=1024, help="sequences per step (1024)")
    p.add_argument(
        "--precision", choices=sorted(PRECISIONS), help="default: bf16 on GPUs, fp32 on CPU"
    )
    p.add_argument("--tasks-per-node", type=int, help="devices per node (default: the profile's)")
    p.add_argument(
        "--memory-fraction", type=float, default=0.9, help="share of device memory to plan for"
    )
    p.add_argument("--micro-batch-sizes", default="1,2,4,8", help="comma-separated (1,2,4,8)")
    p.add_argument(
        "--flash-attention",
        action="store_true",
        help="attention probabilities are not stored (flash attention)",
    )
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--top", type=int, default=8, help="accepted layouts to list")
    p.add_argument("--json", action="store_true", help="print every candidate as JSON")
    p.add_argument(
        "--device",
        help=f"the device throughput is predicted for ({', '.join(DEVICES)}); default: the "
        "profile's (none for a CPU profile: no prediction)",
    )
    p.add_argument("--layout", help="TP,PP: predict this layout only")
    p.add_argument(
        "--recompute", choices=("none", "selective", "full"), help="only this recompute mode"
    )


def _model(spec: str, seq_length: int | None):
    from megatron_ext.models.presets import load_model_yaml, resolve_model_config

    model = load_model_yaml(spec) if Path(spec).is_file() else resolve_model_config(spec)
    return model.replace(seq_length=seq_length) if seq_length else model


def _candidate_dict(c: Candidate) -> dict:
    lay = c.layout
    d = {
        "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "micro_batch_size": lay.micro_batch_size,
        "activation_checkpointing": lay.recompute, "fits": c.fits, "reasons": c.reasons,
        "relative_time": None if c.relative_time == float("inf") else round(c.relative_time, 4),
    }  # fmt: skip
    if c.estimate:
        d["memory_gib"] = {k: round(v, 3) for k, v in c.estimate.as_gib().items()}
    if c.prediction:
        d.update(_prediction_dict(c))
    return d


def _prediction_dict(c: Candidate) -> dict:
    p = c.prediction
    return {
        "step_time_s": round(p.step_time_s, 4),
        "tokens_per_s": round(p.tokens_per_s, 1),
        "tflops_per_device_model": round(p.tflops_per_device_model, 2),
        "tflops_per_device_hardware": round(p.tflops_per_device_hardware, 2),
        "mfu": round(p.mfu, 4),
        "bubble": round(p.bubble, 4),
        "micro_batches": p.micro_batches,
        "time_shares": {k: round(v, 4) for k, v in p.shares.items()},
    }


def _parse_layout(text: str) -> tuple[int, int]:
    try:
        tp, pp = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--layout {text!r}: give TP,PP, e.g. --layout 4,12") from None
    if tp < 1 or pp < 1:
        raise UserError(f"--layout {text!r}: tp and pp must be at least 1")
    return tp, pp


def run(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    model = _model(args.model, args.seq_length)
    devices = args.tasks_per_node or profile.tasks_per_node
    name = args.device or profile.planner_device
    dev = None if name is None else device(name)
    layout = None if args.layout is None else _parse_layout(args.layout)
    if not profile.device_memory_gb:
        raise UserError(f"{profile.path}: device_memory_gb is not set; the planner needs it")
    req = PlanRequest(
        model=model,
        nodes=args.nodes,
        devices_per_node=devices,
        device_memory_gb=profile.device_memory_gb,
        seq_length=model.seq_length,
        global_batch_size=args.global_batch,
        precision=args.precision or ("bf16" if profile.gpus_per_node else "fp32"),
        memory_fraction=args.memory_fraction,
        micro_batch_sizes=tuple(int(x) for x in args.micro_batch_sizes.split(",")),
        attention_scores=not args.flash_attention,
        sequence_parallel=args.sequence_parallel,
        device=dev,
        links=None if dev is None else links_for(profile.planner_links or "generic", dev.name),
        recompute_modes=(args.recompute,) if args.recompute else RECOMPUTE,
        layouts=None if layout is None else (layout,),
    )
    candidates = plan(req)
    good = accepted(candidates) if layout is None else [c for c in candidates if c.fits]
    if layout is not None:
        return _one_layout(args, req, candidates, layout, profile)
    if args.json:
        print(json.dumps([_candidate_dict(c) for c in candidates], indent=1))
        return 0 if good else 1
    print(
        f"{args.model}: {total_params(model) / 1e9:.2f}B parameters, seq {model.seq_length}, "
        f"global batch {req.global_batch_size}, {req.precision}; {args.nodes} node(s) x "
        f"{devices} {profile.device_name} ({profile.name}); budget "
        f"{req.budget_bytes / GiB:.1f} GiB per device ({req.memory_fraction:.0%} of "
        f"{profile.device_memory_gb:g} GiB)"
    )
    if not good:
        print("no layout fits; the closest refusals:")
        for c in [c for c in candidates if c.estimate][:5]:
            print(f"  {_short(c)}: {'; '.join(c.reasons)}")
        print("more nodes, a shorter sequence, or a smaller global batch would help")
        return 1
    from megatron_ext.planner import checkpoint_io
    from megatron_ext.training.config import CheckpointConfig

    tp0 = good[0].layout.tp
    save = checkpoint_io.save_report(
        checkpoint_io.checkpoint_bytes(model, tp0, req.precision),
        profile.filesystem_write_gb_s,
        profile.signal_margin_s,
        CheckpointConfig.save_timeout_s,  # the default
    )
    print(
        f"checkpoint: {save['gb']:,.1f} GB (weights, fp32 master, Adam moments); a save takes "
        f"~{save['save_s']:,.0f} s at {save['filesystem_gb_s']:g} GB/s against a Slurm signal "
        f"margin of {save['signal_margin_s']} s"
    )
    for warning in save["warnings"]:
        print(f"  warning: {warning}")
    print("\nproposed: " + _short(good[0]))
    print(_breakdown(good[0]))
    for reason in good[0].reasons:
        print(f"  - {reason}")
    if good[0].prediction is not None:
        print(_predicted_line(good[0]))
    lay = good[0].layout
    print("  run config:")
    print(f"    parallel: {{tp: {lay.tp}, pp: {lay.pp}}}")
    print(
        f"    train: {{micro_batch_size: {lay.micro_batch_size}, global_batch_size: "
        f"{req.global_batch_size}, activation_checkpointing: {lay.recompute}, "
        f"precision: {req.precision}}}"
    )
    print(f"\naccepted layouts: {len(good)} (the first {min(args.top, len(good))}, fastest first)")
    if dev is None:
        print("   tp   pp   dp  mbs  recompute    GiB  rel.time")
    else:
        checked = (
            "checked against published runs"
            if dev.family in ("nvidia-ampere", "amd-cdna2")
            else ("its matmul share assumed from A100: not checked against a published run")
        )
        print(f"predicted for {dev.name} (planner/throughput.py; {checked})")  # fmt: skip
        print("   tp   pp   dp  mbs  recompute    GiB   step s   tokens/s  TFLOPs hw  MFU  "
              "bubble  comm")  # fmt: skip
    for c in good[: args.top]:
        lay = c.layout
        row = (f"  {lay.tp:>3}  {lay.pp:>3}  {lay.dp:>3}  {lay.micro_batch_size:>3}  "
               f"{lay.recompute:<9}  {c.estimate.total / GiB:>5.1f}")  # fmt: skip
        if c.prediction is None:
            print(f"{row}  {c.relative_time / good[0].relative_time:>8.2f}")
        else:
            p = c.prediction
            comm = sum(v for k, v in p.shares.items() if k.endswith("communication"))
            print(f"{row}  {p.step_time_s:>7.2f}  {p.tokens_per_s:>9,.0f}  "
                  f"{p.tflops_per_device_hardware:>9.1f}  {p.mfu:>4.0%}  {p.shares['bubble']:>6.0%}"
                  f"  {comm:>4.0%}")  # fmt: skip
    if dev is not None:
        best = good[0].prediction.step_time_s
        close = [c for c in good if c.prediction.step_time_s <= best * (1 + TIE)]
        print(f"{len(close)} layout(s) within {TIE:.0%} of the fastest: ties within the model's "
              "error (up to 10% on published runs); the bubble and comm columns show where the "
              "others lose time")  # fmt: skip
    refused = Counter(_kind(c.reasons[0]) for c in candidates if not c.fits)
    print("refused: " + ", ".join(f"{n} {k}" for k, n in refused.most_common()))
    return 0


def _short(c: Candidate) -> str:
    lay = c.layout
    return (
        f"tp={lay.tp} pp={lay.pp} dp={lay.dp} micro-batch {lay.micro_batch_size}, "
        f"activation checkpointing {lay.recompute}"
    )


def _breakdown(c: Candidate) -> str:
    g = c.estimate.as_gib()
    return (
        f"  memory per device (stage {c.estimate.stage}, {c.estimate.params / 1e9:.2f}B params): "
        f"weights {g['weights']:.1f} + gradients {g['gradients']:.1f} + optimizer (ZeRO-1) "
        f"{g['optimizer']:.1f} + activations {g['activations']:.1f} (no recompute "
        f"{g['activations_no_recompute']:.1f}, full {g['activations_full_recompute']:.1f}) + "
        f"logits {g['logits']:.1f} + pipeline buffers {g['pipeline_buffers']:.1f} = "
        f"{g['total']:.1f} GiB"
    )


def _kind(reason: str) -> str:
    if reason.startswith("needs"):
        return "do not fit"
    if "global batch" in reason:
        return "batch not divisible"
    return "do not divide the model"


def _one_layout(args, req: PlanRequest, candidates: list[Candidate], layout, profile) -> int:
    """`plan --layout TP,PP`: the layout's candidates (one per micro-batch size and recompute
    mode given), with the checkpoint's save time at the profile's filesystem bandwidth; with
    --json one object when there is one candidate, else a list."""
    from megatron_ext.planner import checkpoint_io

    nbytes = checkpoint_io.checkpoint_bytes(req.model, layout[0], req.precision)
    save_s = nbytes / 1e9 / profile.filesystem_write_gb_s
    if not candidates:
        tp, pp = layout
        if req.devices_per_node % tp:
            why = f"tp={tp} does not divide the {req.devices_per_node} devices of a node"
        else:
            why = f"tp x pp = {tp * pp} does not divide the {req.world_size} devices"
        raise UserError(f"--layout {args.layout}: {why} (tensor parallelism stays in a node)")
    if args.json:
        rows = [{**_candidate_dict(c), "checkpoint_gb": round(nbytes / 1e9, 1),
                 "checkpoint_save_s": round(save_s, 1)} for c in candidates]  # fmt: skip
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=1))
        return 0 if any(c.fits for c in candidates) else 1
    print(f"checkpoint: {nbytes / 1e9:,.1f} GB, a save ~{save_s:,.0f} s at "
          f"{profile.filesystem_write_gb_s:g} GB/s ({profile.name})")  # fmt: skip
    for c in candidates:
        print(_short(c) + (": fits" if c.fits else ": refused"))
        for reason in c.reasons:
            print(f"  - {reason}")
        if c.prediction is not None:
            print(_predicted_line(c))
    return 0 if any(c.fits for c in candidates) else 1


def _predicted_line(c: Candidate) -> str:
    p = c.prediction
    shares = ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in p.shares.items() if v >= 0.005)
    return (
        f"  predicted: step {p.step_time_s:.2f} s, {p.tokens_per_s:,.0f} tokens/s, "
        f"{p.tflops_per_device_hardware:.1f} TFLOPs per device counting recompute "
        f"({p.tflops_per_device_model:.1f} model FLOPs), MFU {p.mfu:.0%}; time: {shares}"
    )
