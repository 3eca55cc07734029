"""Atomic, verified checkpoints of the pipeline engine, and loading with fallback.

Layout of `<checkpoint.dir>`:
    iter_0000100/          DeepSpeed's per-layer model files, ZeRO-1 optimizer shards,
                           rng_rank{r}.pt (per rank: python, numpy, torch, CUDA and TP-tracker
                           states, as tensors and plain data), config.yaml (the resolved run config),
                           manifest.json (name, size and CRC-32 of every file; written last)
    latest                 the tag of the newest complete checkpoint
Saving writes under `iter_XXXXXXX.tmp`, then rank 0 renames it and replaces `latest` (temp file
+ os.replace): a run killed at any point leaves either the old or the new checkpoint complete.
The checksums are computed while the files are written (checkpoint_format.py). On load the
manifest is checked (sizes), and each rank checks each file's checksum just before unpickling it,
weights-only: a missing, short, corrupted or code-carrying file falls back to the previous
complete checkpoint with a warning naming the file, never loading garbage or running code.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_ext import checkpoint_format
from megatron_ext.checkpoint_format import (  # noqa: F401 - also used as checkpointing.X
    MANIFEST,
    TAG_RE,
    Manifest,
    candidates,
    list_checkpoints,
    tag_of,
    verify,
    write_latest,
)
from megatron_ext.config import dump_yaml
from megatron_ext.errors import UserError
from megatron_ext.filelock import FileLock, take_lock
from megatron_ext.log import get_logger
from megatron_ext.parallel import distributed
from megatron_ext.parallel.distributed import all_agree

log = get_logger(__name__)

RUN_LOCK = ".run.lock"  # held by rank 0 of the run using the directory


def _rng_state(engine) -> dict:
    """Every RNG of this rank as tensors and plain data (loads weights-only, no numpy pickles)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "tracker": engine.ctx.rng.get_states(),  # TP-split dropout masks
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(engine, state: dict) -> None:
    engine.ctx.rng.set_states(state.get("tracker", {}))  # saved before dropout was seeded: none
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        keys = npy["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    else:  # saved before 2026-12: numpy's own state tuple
        np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_rng(path: Path, manifest: Manifest) -> dict:
    """A rank's RNG file, checksum-checked and weights-only. Files saved before 2026-12 hold a
    numpy array: numpy's array reconstruction is allowed for them (data, no code)."""
    from numpy._core.multiarray import _reconstruct

    numpy_types = [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),  # pickled by numpy 1.x
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]
    with torch.serialization.safe_globals(numpy_types):
        return checkpoint_format.load_file(path, manifest)


def save(engine, root: str, iteration: int, client_state: dict, run_config, keep: int) -> str:
    """Save a checkpoint of every rank (collective); returns the final tag.

    The collectives inside run under checkpoint.save_timeout_s (restored to
    train.collective_timeout_s after): a slow filesystem must not time a save out. Rotated
    checkpoints are deleted by a background thread of rank 0 after `latest` moved, outside the
    critical path (`wait_for_rotation` joins it). With checkpoint.async_save the files are
    written in the background (training/async_checkpoint.py): the checkpoint becomes `latest`
    later, when every rank's part is on disk; `finish_saves` waits for that."""
    with _save_timeouts(run_config):
        _wait_for_previous(engine)
        if run_config.checkpoint.async_save:
            return _save_async(engine, root, iteration, client_state, run_config, keep)
        return _save(engine, root, iteration, client_state, run_config, keep)


@contextlib.contextmanager
def _save_timeouts(run_config):
    """Collectives under checkpoint.save_timeout_s, then back to train.collective_timeout_s."""
    distributed.set_group_timeouts(run_config.checkpoint.save_timeout_s)
    try:
        yield
    finally:
        distributed.set_group_timeouts(run_config.train.collective_timeout_s)


def _start_tmp(root_p: Path, tag: str) -> Path:
    tmp = root_p / (tag + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return tmp


def _publish(root_p: Path, tag: str, checksums: dict, keep: int, started: float, how: str) -> None:
    """Rank 0: the manifest, the rename of <tag>.tmp, `latest`, the rotation (in that order)."""
    tmp = root_p / (tag + ".tmp")
    checkpoint_format.write_manifest(tmp, checksums)
    final = root_p / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_latest(root_p, tag)
    _rotate(root_p, list_checkpoints(root_p)[:-keep] if keep > 0 else [])
    seconds = time.monotonic() - started
    size = sum(size for size, _ in checksums.values())
    log.info(
        "saved checkpoint %s in %.1f s%s (%.3g GB, %.3g GB/s)",
        final, seconds, how, size / 1e9, size / 1e9 / max(seconds, 1e-9),
    )  # fmt: skip
    COMPLETED.append(int(TAG_RE.match(tag).group(1)))


def _save(engine, root: str, iteration: int, client_state: dict, run_config, keep: int) -> str:
    started = time.monotonic()
    root_p = Path(root)
    tag = tag_of(iteration)
    tmp = _start_tmp(root_p, tag)
    rank = dist.get_rank()
    files = engine.ds.checkpoint_engine  # checksums as it writes (checkpoint_format)
    engine.ds.save_checkpoint(
        str(root_p), tag=tmp.name, client_state=client_state, save_latest=False
    )
    files.save(_rng_state(engine), str(tmp / f"rng_rank{rank}.pt"))
    written = [None] * dist.get_world_size()
    dist.all_gather_object(written, files.take_written(tmp))
    if rank == 0:
        dump_yaml(run_config, tmp / "config.yaml")
        checksums = {k: v for part in written for k, v in part.items()}
        _publish(root_p, tag, checksums, keep, started, "")
    dist.barrier()
    return tag


def _save_async(engine, root: str, iteration: int, client_state: dict, run_config, keep: int):
    """Snapshot to host memory (the only stall), queue the writes, and on rank 0 start the
    finaliser that publishes the checkpoint once every rank's part marker is there."""
    global _FINALISER
    started = time.monotonic()
    root_p = Path(root)
    tag = tag_of(iteration)
    tmp = _start_tmp(root_p, tag)
    rank, world = dist.get_rank(), dist.get_world_size()
    files = engine.ds.checkpoint_engine
    writer = _writer_of(files, rank)
    writer.snapshot_s = 0.0
    engine.ds.save_checkpoint(
        str(root_p), tag=tmp.name, client_state=client_state, save_latest=False
    )
    files.save(_rng_state(engine), str(tmp / f"rng_rank{rank}.pt"))
    writer.close_part(tmp)
    if rank == 0:
        dump_yaml(run_config, tmp / "config.yaml")
        deadline = started + run_config.checkpoint.save_timeout_s
        _FINALISER = threading.Thread(
            target=_finalise,
            args=(root_p, tag, world, keep, started, deadline),
            name="checkpoint-finaliser",
            daemon=True,
        )
        _FINALISER.start()
    dist.barrier()
    if rank == 0:
        log.info(
            "checkpoint %s: state copied to host memory in %.2f s, writing in the background",
            tag, time.monotonic() - started,
        )  # fmt: skip
    return tag


_FINALISER: threading.Thread | None = None
_FINALISE_ERROR: list[str] = []
_HURRY = threading.Event()  # set while training waits for the finaliser: poll faster
COMPLETED: list[int] = []  # iterations whose checkpoint became `latest` (`take_completed`)


def _writer_of(files, rank: int):
    from megatron_ext.training.async_checkpoint import BackgroundWriter

    if files.background is None:
        files.background = BackgroundWriter(files, rank)
    return files.background


def _finalise(root_p: Path, tag: str, world: int, keep: int, started: float, deadline: float):
    from megatron_ext.training import async_checkpoint

    tmp = root_p / (tag + ".tmp")
    try:
        missing = async_checkpoint.wait_for_parts(tmp, world, deadline, _HURRY)
        if missing:
            raise RuntimeError(
                f"ranks {missing[:8]}{' ...' if len(missing) > 8 else ''} did not finish writing "
                f"their part within checkpoint.save_timeout_s"
            )
        written = async_checkpoint.read_parts(tmp, world)
        problem = async_checkpoint.check_sizes(tmp, written)
        if problem:
            raise RuntimeError(problem)
        shutil.rmtree(tmp / async_checkpoint.PARTS)
        _publish(root_p, tag, written, keep, started, " (written in the background)")
    except Exception as exc:  # noqa: BLE001 - reported by finish_saves / the next save
        message = f"asynchronous save of {tag} not published: {exc}; `latest` is unchanged"
        log.error("%s", message)
        _FINALISE_ERROR.append(message)


def reset_async_state() -> None:
    """A new run in this process (tests, quickstart) starts without the last one's state."""
    _join_finaliser()
    _FINALISE_ERROR.clear()
    COMPLETED.clear()


def _wait_for_previous(engine) -> None:
    """Before a save: this rank's writes of the previous save are done, and on rank 0 the
    previous checkpoint is published (collective). A failure anywhere raises on every rank."""
    writer = getattr(engine.ds.checkpoint_engine, "background", None)
    if writer is None:
        return
    started = time.monotonic()
    error = writer.wait()
    if dist.get_rank() == 0:
        _join_finaliser()
    waited = time.monotonic() - started
    if waited > 0.5:
        log.warning(
            "waited %.1f s for the previous asynchronous save (a save takes longer than "
            "checkpoint.interval steps)", waited,
        )  # fmt: skip
    if dist.get_rank() == 0 and _FINALISE_ERROR:
        error = error or _FINALISE_ERROR[-1]
    _FINALISE_ERROR.clear()
    if not all_agree(error is None):
        raise UserError(
            error
            or "another rank's asynchronous checkpoint write failed (its log names the "
            "file); the last published checkpoint is kept"
        )


def _join_finaliser() -> None:
    global _FINALISER
    if _FINALISER is not None:
        _HURRY.set()
        _FINALISER.join()
        _FINALISER = None
        _HURRY.clear()


def finish_saves(engine, run_config) -> None:
    """Wait for an asynchronous save in flight to be written and published (collective): at the
    end of a run and before a stop exits. Raises UserError on every rank if it failed."""
    with _save_timeouts(run_config):
        _wait_for_previous(engine)


def take_completed() -> list[int]:
    """The iterations whose checkpoints became `latest` since the last call (rank 0)."""
    done = COMPLETED[:]
    del COMPLETED[: len(done)]
    return done


_ROTATION: threading.Thread | None = None


def _rotate(root: Path, old: list[str]) -> None:
    """Delete the rotated checkpoints OLD (and their universal copies) in the background; a
    deletion still running from the previous save is waited for first."""
    global _ROTATION
    wait_for_rotation()
    # renamed first (fast, atomic): a resume never picks a half-deleted checkpoint
    doomed = sorted(root.glob(".*.deleting"))  # left by a run killed while deleting
    for tag in old:
        for name in (tag, f"{tag}{checkpoint_format.UNIVERSAL_SUFFIX}"):
            if (root / name).exists():
                os.replace(root / name, root / f".{name}.deleting")
                doomed.append(root / f".{name}.deleting")

    if not doomed:
        return

    def delete() -> None:
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    _ROTATION = threading.Thread(target=delete, name="checkpoint-rotation", daemon=True)
    _ROTATION.start()


def wait_for_rotation() -> None:
    """Join the background deletion of rotated checkpoints (before exit, before the next)."""
    global _ROTATION
    if _ROTATION is not None:
        _ROTATION.join()
        _ROTATION = None


def set_aside(root: str, why: list[str]) -> Path | None:
    """Move every checkpoint of ROOT (iter_*, their universal copies, `latest`) and the run's
    metrics into ROOT/set-aside-<UTC time>/ with a WHY.txt (rank 0; the others wait)."""
    root_p, aside = Path(root), None
    if dist.get_rank() == 0:
        aside = root_p / time.strftime("set-aside-%Y%m%dT%H%M%SZ", time.gmtime())
        aside.mkdir()
        names = [*list_checkpoints(root_p), "latest", "metrics.jsonl", "tensorboard"]
        names += [p.name for p in root_p.glob(f"iter_*{checkpoint_format.UNIVERSAL_SUFFIX}")]
        for name in names:
            if (root_p / name).exists():
                os.replace(root_p / name, aside / name)
        (aside / "WHY.txt").write_text(
            "set aside by `megatron-ext train --start-over`: no checkpoint here loaded\n"
            + "".join(f"{line}\n" for line in why)
        )
        log.warning("no checkpoint in %s loads: moved them to %s; starting over", root_p, aside)
    dist.barrier()
    return aside


def saved_skips(root: str) -> list[list[int]] | None:
    """train.skip_samples in the config.yaml of ROOT's newest checkpoint (where `megatron-ext
    rollback` records them): a resume keeps skipping them whatever the run's own config says."""
    from megatron_ext.config import read_yaml
    from megatron_ext.training.config import check_skip_samples

    for tag in candidates(Path(root)):
        path = Path(root) / tag / "config.yaml"
        if path.is_file():
            train = read_yaml(path).get("train") or {}
            ranges = train.get("skip_samples") if isinstance(train, dict) else None
            try:
                check_skip_samples(ranges)
            except UserError as exc:
                raise UserError(f"{path}: {exc}") from None
            return ranges
    return None


def newest_complete(root: Path) -> str:
    """The tag `load` would try first that passes verification (`latest` first, then older);
    UserError listing each problem when none does."""
    tags = candidates(root)
    if not tags:
        raise UserError(
            f"{root}: no iter_* checkpoint here; is this a megatron-ext checkpoint dir?"
        )
    problems = []
    for tag in tags:
        problem = verify(root / tag)
        if problem is None:
            return tag
        problems.append(f"{tag}: {problem}")
    raise UserError(f"{root}: no complete checkpoint:\n  " + "\n  ".join(problems))


def lock_run_dir(root: str) -> FileLock | None:
    """One run per checkpoint directory (collective): rank 0 takes ROOT/.run.lock and holds it
    until `release_run_dir`; when another run holds it every rank raises a UserError naming that
    run's host and process. The lock dies with its process: a crashed run leaves none behind."""
    lock, held_by = take_run_lock(root) if dist.get_rank() == 0 else (None, None)
    box = [held_by]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise UserError(
            f"checkpoint.dir={root} is in use by another run ({box[0]}): one run per checkpoint "
            "directory. Wait for it to end or stop it, or give this run another checkpoint.dir"
        )
    return lock


def take_run_lock(root: str | Path) -> tuple[FileLock | None, str | None]:
    """(ROOT/.run.lock, held now, None) or (None, who holds it): no waiting, one process."""
    return take_lock(Path(root) / RUN_LOCK)


def release_run_dir(lock: FileLock | None) -> None:
    if lock is not None:
        lock.__exit__(None, None, None)


def on_rank0(fn):
    """fn() on rank 0 only, its result (or the UserError it raised) shared with every rank
    (collective). For what reads checkpoint directories: at 384 ranks every rank listing and
    stat-ing the same files is a metadata storm on Lustre."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except UserError as exc:
            box[0] = (False, str(exc))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise UserError(value)
    return value


def _verified_once(tag_dir: Path) -> str | None:
    """`verify(tag_dir)` (a stat of every file of the manifest) on rank 0 only. Each rank still
    checks the checksum of each file it reads (the checkpoint engine)."""
    return on_rank0(lambda: verify(tag_dir))


def load(
    engine,
    root: str,
    *,
    weights_only: bool = False,
    universal_tag: str | None = None,
    failures: list[str] | None = None,
    only_tag: str | None = None,
) -> tuple[str, dict] | None:
    """Load the newest good checkpoint under `root` (collective). None when there is none.

    weights_only: continued pretraining (reset iteration, optimizer and scheduler).
    universal_tag: load this converted universal checkpoint (layout change; no RNG states).
    failures: gets one "DIR: why" line per checkpoint tried and skipped on this rank.
    only_tag: try only this checkpoint (no fallback to older ones).
    """
    failures = [] if failures is None else failures
    root_p = Path(root)
    engine.ds.checkpoint_engine.forget_manifests()  # read each tag's manifest afresh
    tags = [universal_tag] if universal_tag else [only_tag] if only_tag else candidates(root_p)
    for tag in tags:
        problem = None if universal_tag else _verified_once(root_p / tag)
        if not all_agree(problem is None):
            problem = problem or "incomplete on another rank"
            log.warning("checkpoint %s skipped: %s; trying an older one", root_p / tag, problem)
            failures.append(f"{root_p / tag}: {problem}")
            continue
        try:
            _, client_state = engine.ds.load_checkpoint(
                str(root_p),
                tag=tag,
                load_optimizer_states=not weights_only,
                load_lr_scheduler_states=not weights_only,
                load_module_only=weights_only,
            )
            ok = client_state is not None or weights_only
        except Exception as exc:  # noqa: BLE001 - any load failure falls back
            log.warning("checkpoint %s failed to load: %s", root_p / tag, exc)
            error = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            failures.append(f"{root_p / tag}: failed to load: {type(exc).__name__}: {error}")
            ok = False
        if not all_agree(ok):
            log.warning("checkpoint %s not usable on every rank; trying an older one", root_p / tag)
            if ok:
                failures.append(f"{root_p / tag}: failed to load on another rank")
            continue
        rng = root_p / tag / f"rng_rank{dist.get_rank()}.pt"
        if not weights_only and not universal_tag and rng.is_file():
            try:
                state = _load_rng(rng, engine.ds.checkpoint_engine.manifest(root_p / tag))
            except checkpoint_format.CheckpointRefused as exc:
                log.warning("checkpoint %s failed to load: %s", root_p / tag, exc)
                failures.append(f"{root_p / tag}: failed to load: {exc}")
                state = None
            if not all_agree(state is not None):
                if state is not None:
                    failures.append(f"{root_p / tag}: failed to load on another rank")
                continue
            _set_rng_state(engine, state)
        log.info("loaded checkpoint %s%s", root_p / tag, " (weights only)" if weights_only else "")
        return tag, client_state or {}
    return None
