"""`megatron-ext rollback --checkpoint DIR --to ITER --skip-samples A:B ...`: go back to an
earlier checkpoint and train on without some samples (the BLOOM-era recovery from a loss spike).

ITER becomes `latest`; the skipped ranges (global sample indices, end exclusive) are recorded in
ITER's config.yaml (`train.skip_samples`, its manifest entry rewritten), which a resume merges
with the run's own config, so they stay skipped in every later checkpoint. The later checkpoints
and the metrics are moved to DIR/rolled-back-<UTC time>/ with a WHY.txt, never deleted. Refused
while a run holds the directory, for an incomplete ITER, and for samples ITER has already
trained on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from megatron_ext import checkpoint_format
from megatron_ext.checkpoint_format import Manifest, list_checkpoints, tag_of
from megatron_ext.config import dump_yaml, read_yaml
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.training.checkpointing import release_run_dir, take_run_lock
from megatron_ext.training.config import check_skip_samples
from megatron_ext.training.data import SkippedSamples, merge_skips

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="the run's checkpoint.dir")
    p.add_argument("--to", type=int, required=True, metavar="ITER", help="the iteration to resume")
    p.add_argument(
        "--skip-samples",
        action="append",
        default=[],
        metavar="A:B",
        help="global sample indices [A, B) never to train on (repeatable)",
    )
    p.add_argument("--reason", default="", help="a note kept with the rolled-back checkpoints")


def parse_range(text: str) -> list[int]:
    a, sep, b = text.partition(":")
    try:
        pair = [int(a), int(b)]
    except ValueError:
        pair = []
    if not sep or not pair or not 0 <= pair[0] < pair[1]:
        raise UserError(f"--skip-samples {text}: expected A:B with 0 <= A < B (B exclusive)")
    return pair


def run(args: argparse.Namespace) -> int:
    root, ranges = Path(args.checkpoint), [parse_range(s) for s in args.skip_samples]
    tag = tag_of(args.to)
    lock, held_by = take_run_lock(root)
    if held_by is not None:
        raise UserError(f"{root} is in use by a run ({held_by}): stop it first")
    try:
        aside = rollback(root, tag, ranges, args.reason)
    finally:
        release_run_dir(lock)
    print(f"{root}: {tag} is latest; later checkpoints and metrics moved to {aside}")
    return 0


def rollback(root: Path, tag: str, ranges: list[list[int]], reason: str = "") -> Path:
    tag_dir = root / tag
    if not tag_dir.is_dir():
        have = ", ".join(list_checkpoints(root)) or "none"
        raise UserError(f"{tag_dir}: no such checkpoint (there: {have})")
    problem = checkpoint_format.verify(tag_dir)
    if problem:
        raise UserError(f"{tag_dir} is not complete: {problem}")
    manifest = Manifest(tag_dir)
    config = read_yaml(tag_dir / "config.yaml")
    saved = (config.get("train") or {}).get("skip_samples")
    consumed = _consumed_samples(tag_dir, manifest)
    first_unread = SkippedSamples(saved).index(consumed)
    for a, b in ranges:
        if a < first_unread:
            raise UserError(
                f"--skip-samples {a}:{b}: {tag} has already trained on the samples before "
                f"{first_unread} (its consumed_samples is {consumed}); roll back further"
            )
    merged = merge_skips(saved, ranges)
    check_skip_samples(merged)
    _record_skips(tag_dir, manifest, config, merged)
    aside = _move_later(root, tag, ranges, reason)
    checkpoint_format.write_latest(root, tag)
    log.info("rolled %s back to %s, skipping samples %s", root, tag, merged)
    return aside


def _consumed_samples(tag_dir: Path, manifest: Manifest) -> int:
    path = checkpoint_format.mp_rank_file(tag_dir, 0)
    state = checkpoint_format.load_file(path, manifest, map_location="cpu")
    if "consumed_samples" not in state:
        raise UserError(f"{path}: no consumed_samples; not a megatron-ext training checkpoint")
    return int(state["consumed_samples"])


def _record_skips(tag_dir: Path, manifest: Manifest, config: dict, merged: list) -> None:
    """train.skip_samples into TAG_DIR/config.yaml, and its new checksum into the manifest
    (the others are kept: nothing else is read again)."""
    config.setdefault("train", {})["skip_samples"] = merged
    tmp = tag_dir / "config.yaml.tmp"
    dump_yaml(config, tmp)
    os.replace(tmp, tag_dir / "config.yaml")
    kept = {
        name: (meta["size"], meta["crc32"])
        for name, meta in manifest.files.items()
        if name != "config.yaml" and "crc32" in meta
    }
    checkpoint_format.write_manifest(tag_dir, kept)
    checkpoint_format.fsync_dir(tag_dir)


def _move_later(root: Path, tag: str, ranges: list, reason: str) -> Path:
    """The checkpoints after TAG (and their universal copies) moved aside, the metrics copied."""
    aside = root / time.strftime("rolled-back-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    later = [t for t in list_checkpoints(root) if t > tag]
    universal = checkpoint_format.UNIVERSAL_SUFFIX
    later += [p.name for p in root.glob(f"iter_*{universal}") if p.name.split(universal)[0] > tag]
    for name in later:
        os.replace(root / name, aside / name)
    if (root / "metrics.jsonl").is_file():
        shutil.copy2(root / "metrics.jsonl", aside / "metrics.jsonl")
    skips = " ".join(f"{a}:{b}" for a, b in ranges) or "none"
    (aside / "WHY.txt").write_text(
        f"megatron-ext rollback --to {tag}: the run goes on from {tag} without samples "
        f"{skips}; these checkpoints came after it.\n{reason}\n"
    )
    checkpoint_format.fsync_dir(root)
    return aside
