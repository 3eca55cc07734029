"""`convert reshard --with-optimizer`: weights, ZeRO-1 optimizer state and LR schedule at a new
(tp, pp), written by DeepSpeed itself.

The source tag is converted to a DeepSpeed universal checkpoint in a work directory beside the
output (the source checkpoint is only read: the work directory links to it) by `workers`
processes (convert/to_universal.py), then tp * pp local ranks build the real engine at the new
layout, load the universal checkpoint exactly as a layout-change resume does and save a regular
trainer checkpoint (training/checkpointing.save). The output has dp = 1. The work directory
`.<output>.reshard` is removed at the end; a run that was killed leaves it, and running the
same command again resumes the conversion. The output appears under its final name only when
every rank has saved.

`--universal` instead converts the checkpoint in place (`<tag>_universal` beside it), which a
`train` at any (tp, pp, dp) then loads: the way a large run changes layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_ext import checkpoint_format
from megatron_ext.convert import layout
from megatron_ext.convert.trainer_ckpt import open_checkpoint
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)


def _check_layout(ckpt, tp_size: int, pp_size: int) -> None:
    config = ckpt.config
    config.check_tp(tp_size)
    layout.stage_layers(config, pp_size)
    kv = config.num_kv_heads
    if tp_size != ckpt.tp_size and (kv % tp_size or kv % ckpt.tp_size):
        raise UserError(
            f"{ckpt.tag_dir}: tp={ckpt.tp_size} -> tp={tp_size} with {kv} key/value heads "
            "splits a kv group's fused QKV rows, which the universal checkpoint cannot re-slice; "
            "choose a TP size dividing the kv heads (or reshard weights only)"
        )
    _require_optimizer_state(ckpt.tag_dir, "reshard it without --with-optimizer")


def _require_optimizer_state(tag_dir: Path, advice: str) -> None:
    # bf16 runs write bf16_zero_pp_rank_* (DeepSpeed's prefix whenever bf16 is on)
    if not any(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")):
        raise UserError(
            f"{tag_dir} has no optimizer state (zero_pp_rank_*_optim_states.pt); {advice}"
        )


def _link_source(ckpt, tag_dir: Path) -> None:
    """The source tag as links, except mp_rank_* (small): copied with this version's
    universal_checkpoint_info, which tells DeepSpeed how each parameter is split over TP (a
    checkpoint saved by an older version may carry an incomplete one). Every source file is
    checked against its manifest checksum first; the copy gets its own manifest."""
    import torch

    manifest = checkpoint_format.Manifest(ckpt.tag_dir)
    problem = manifest.check_contents()
    if problem is not None:
        raise UserError(f"{ckpt.tag_dir}: not resharded: {problem}")
    tag_dir.mkdir()
    info = checkpoint_format.universal_info(ckpt.config)
    known = {}
    for path in sorted(ckpt.tag_dir.iterdir()):
        if path.name == checkpoint_format.MANIFEST:
            continue
        if checkpoint_format.is_mp_rank_file(path.name):
            state = checkpoint_format.load_file(path, None, map_location="cpu")
            state["universal_checkpoint_info"] = info
            torch.save(state, tag_dir / path.name)
        else:
            (tag_dir / path.name).symlink_to(path.resolve())
            meta = manifest.files.get(path.name)
            if meta is not None and "crc32" in meta:
                known[path.name] = (meta["size"], meta["crc32"])
    checkpoint_format.write_manifest(tag_dir, known)


def reshard_with_optimizer(
    checkpoint: str | Path,
    output: str | Path,
    tp_size: int,
    pp_size: int,
    *,
    iteration: int | None = None,
    timeout_s: float | None = None,
    workers: int = 1,
) -> Path:
    """Convert to a universal checkpoint with WORKERS processes, then spawn tp_size * pp_size
    local ranks that rewrite it at the new layout. Returns the new tag directory."""
    from megatron_ext.convert import to_universal
    from megatron_ext.training.ranks import spawn_local

    ckpt = open_checkpoint(checkpoint, iteration)
    _check_layout(ckpt, tp_size, pp_size)
    output = Path(output)
    if output.exists():
        raise UserError(f"{output} already exists; remove it or choose another output directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    work = output.parent / f".{output.name}.reshard"
    if not (work / ckpt.tag_dir.name / checkpoint_format.MANIFEST).is_file():
        shutil.rmtree(work, ignore_errors=True)  # not even the links were complete
        work.mkdir()
        _link_source(ckpt, work / ckpt.tag_dir.name)
    else:
        log.info("%s: resuming a stopped reshard", work)
    to_universal.convert(work, ckpt.tag_dir.name, workers, checked=True)
    try:
        argv = [
            "convert", "reshard", "--checkpoint", str(checkpoint), "--output", str(output),
            "--tp", str(tp_size), "--pp", str(pp_size), "--with-optimizer",
            "--worker-dir", str(work), "--worker-tag", ckpt.tag_dir.name,
        ]  # fmt: skip
        code = spawn_local(tp_size * pp_size, argv, timeout_s=timeout_s)
        if code != 0 or not output.is_dir():
            shutil.rmtree(output, ignore_errors=True)
            raise RuntimeError(f"reshard --with-optimizer: a rank failed (exit code {code})")
    finally:
        shutil.rmtree(work / "output", ignore_errors=True)  # a rank's partial save
    shutil.rmtree(work, ignore_errors=True)
    return output / (output / "latest").read_text().strip()


def convert_in_place(checkpoint: str | Path, iteration: int | None, workers: int) -> Path:
    """`--universal`: the checkpoint's `<tag>_universal` beside it (resumable)."""
    from megatron_ext.convert import to_universal

    # the conversion checks every file's checksum itself (open_checkpoint would read the
    # model files once more)
    tag_dir = checkpoint_format.resolve_tag_dir(checkpoint, iteration)
    _require_optimizer_state(tag_dir, "nothing to convert")
    return tag_dir.parent / to_universal.convert(tag_dir.parent, tag_dir.name, workers)


def reshard_rank(work: Path, tag: str, output: Path, tp_size: int, pp_size: int) -> int:
    """One rank (the launcher set RANK etc.): build, load the universal checkpoint, save."""
    import torch.distributed as dist

    from megatron_ext.training import checkpointing, universal
    from megatron_ext.training import engine as engine_mod
    from megatron_ext.training.config import saved_run_config
    from megatron_ext.training.ranks import export_dist_env

    export_dist_env()
    config_path = work / tag / "config.yaml"
    cfg = saved_run_config(config_path)
    engine_mod.init_distributed(cfg.train.collective_timeout_s)
    try:
        cfg.parallel.tp, cfg.parallel.pp = tp_size, pp_size
        cfg.checkpoint.dir, cfg.checkpoint.load = str(output), None
        model_config = cfg.model
        engine = engine_mod.build_engine(cfg, model_config, load_universal=True)
        # converted (and the source checked) before the ranks started
        universal_tag = tag + checkpoint_format.UNIVERSAL_SUFFIX
        found = checkpointing.load(engine, str(work), universal_tag=universal_tag)
        if found is None:
            raise RuntimeError(f"{work / universal_tag}: the universal checkpoint did not load")
        client = found[1]
        iteration = int(client.get("iteration", 0))
        state = {
            "iteration": iteration,
            "consumed_samples": int(client.get("consumed_samples", 0)),
            "layout": {"tp": tp_size, "pp": pp_size, "dp": engine.ctx.dp_size},
            "universal_checkpoint_info": universal.universal_info(model_config),
        }
        staging = work / "output"
        checkpointing.save(engine, str(staging), iteration, state, cfg, keep=1)
        if dist.get_rank() == 0:
            os.replace(staging, output)
        dist.barrier()
    finally:
        engine_mod.shutdown()
    return 0
