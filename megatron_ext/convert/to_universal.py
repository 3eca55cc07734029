"""A trainer checkpoint -> DeepSpeed's universal checkpoint, offline, in parallel, resumable.

A resume at another (tp, pp, dp) loads `<tag>_universal` beside `<tag>` (every rank reads its
own slices: DeepSpeed's universal load). Making it is the expensive part (a 176B conversion:
~50 minutes with one worker), so it is an explicit step, never done inside a training job:

    megatron-ext convert reshard --with-optimizer --checkpoint DIR --universal [--workers N]

DeepSpeed's `ds_to_universal` does the work in two parallel phases: extract (one work item per
ZeRO shard file: pipeline stage x TP rank x DP rank, each loading one shard) and merge (one item
per parameter, loading its TP slices). Memory: N workers x the largest item (a shard file, or a
parameter's slices and its merge). Each finished item leaves a marker in `<out>/progress/`
(with the merge's result); a conversion killed at any point restarts where it stopped: finished
items are skipped, a half-written one is done again (its files are rewritten whole). The
output is complete when `complete.json` exists (written last); only then does `train` use it.

Trap: DeepSpeed's converter unpickles with weights_only=False: the source is checked against its
manifest checksums first and weights-only loading is forced (checkpoint_format).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from megatron_ext import checkpoint_format
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

PROGRESS = "progress"
_MARKERS: Path | None = None  # this conversion's progress directory (inherited by the workers)
_REAL: dict = {}  # DeepSpeed's own work functions


def _marker(kind: str, key) -> Path:
    name = "-".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
    return _MARKERS / f"{kind}.{name.replace('/', '_')}.json"


def _extract(temp_dir, ds_checkpoint, indices_3d):
    """DeepSpeed's extract of one ZeRO shard file, skipped when already done."""
    marker = _marker("extract", tuple(indices_3d))
    if marker.is_file():
        return None
    result = _REAL["extract"](temp_dir, ds_checkpoint, indices_3d)
    _write_marker(marker, None)
    return result


def _merge(uc_info, out_dir, slice_dir, tp_degree, name_and_shapes):
    """DeepSpeed's merge of one parameter's TP slices, skipped when already done (its result,
    the patterns it did not match, is kept in the marker)."""
    marker = _marker("merge", name_and_shapes[0])
    if marker.is_file():
        return json.loads(marker.read_text())["result"]
    result = _REAL["merge"](uc_info, out_dir, slice_dir, tp_degree, name_and_shapes)
    _write_marker(marker, sorted(result) if result is not None else None)
    return result


def _write_marker(path: Path, result) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"result": result}))
    os.replace(tmp, path)


def convert(root: str | Path, tag: str, workers: int = 1, checked: bool = False) -> str:
    """Convert ROOT/TAG to ROOT/TAG_universal with WORKERS processes (resuming a conversion that
    was stopped); returns the universal tag. `checked`: the caller verified the source."""
    global _MARKERS
    from deepspeed.checkpoint import ds_to_universal

    root = Path(root)
    out = root / (tag + checkpoint_format.UNIVERSAL_SUFFIX)
    if checkpoint_format.universal_complete(root, tag):
        log.info("%s is already converted", out)
        return out.name
    if not checked:
        problem = checkpoint_format.verify_contents(root / tag)
        if problem is not None:
            raise UserError(f"{root / tag}: not converted to a universal checkpoint: {problem}")
    checkpoint_format.forbid_code_in_loads()
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    done = len(list((out / PROGRESS).glob("*.json")))
    if done:
        log.info("%s: resuming a stopped conversion (%d work items already done)", out, done)
    started = time.monotonic()
    _MARKERS = out / PROGRESS
    _REAL.setdefault("extract", ds_to_universal.extract_zero_shards)
    _REAL.setdefault("merge", ds_to_universal.merge_tp_slices)
    ds_to_universal.extract_zero_shards, ds_to_universal.merge_tp_slices = _extract, _merge
    try:
        ds_to_universal.main(
            argparse.Namespace(
                input_folder=str(root / tag),
                output_folder=str(out),
                num_extract_workers=workers,
                num_merge_workers=workers,
                keep_temp_folder=True,  # a restart reuses the extracted fragments
                strict=True,
                inject_missing_state=False,
            )
        )
    finally:
        ds_to_universal.extract_zero_shards = _REAL["extract"]
        ds_to_universal.merge_tp_slices = _REAL["merge"]
        _MARKERS = None
    shutil.rmtree(out / "tmp", ignore_errors=True)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    seconds = time.monotonic() - started
    info = {"source": tag, "workers": workers, "seconds": round(seconds, 3)}
    (out / checkpoint_format.UNIVERSAL_COMPLETE).write_text(json.dumps(info) + "\n")
    checkpoint_format.write_latest(root, out.name, checkpoint_format.LATEST_UNIVERSAL)
    log.info("converted %s to %s in %.1f s with %d worker(s)", root / tag, out, seconds, workers)
    return out.name
