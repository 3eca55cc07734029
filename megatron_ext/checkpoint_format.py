"""The files of a trainer checkpoint: the manifest with a content checksum per file, and loading
that runs no code from a file.

Manifest (`<tag>/manifest.json`, written last by rank 0):
    {"format": 2, "checksum": "crc32", "files": {"NAME": {"size": N, "crc32": "8 hex digits"}}}
Format 1 (before checksums) is {"files": {"NAME": N}}: still read, sizes only.

The checksum is CRC-32 (zlib, about 6 GB/s on one core, the GIL released): it catches bit flips,
truncation and a file swapped for another, and is computed while the file is written (no second
read). It is not a signature: a hostile writer can forge it. What keeps code out is the loading:
every `torch.load` here is `weights_only=True`, restricted to tensors, plain containers and the
few DeepSpeed types a ZeRO-1 checkpoint holds (`SAFE_GLOBALS`), and `forbid_code_in_loads()`
makes every other `torch.load` of the process weights-only too (DeepSpeed's universal-checkpoint
converter calls `torch.load(weights_only=False)` itself).

Each rank checks the checksum of each file it loads just before unpickling it (in parallel across
ranks, each file read once more from the page cache), through `ChecksummedCheckpointEngine`,
which replaces DeepSpeed's checkpoint engine in the trainer.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT = 2
CHUNK = 8 << 20


class CheckpointRefused(UserError):
    """A checkpoint file that must not be loaded (corrupt, tampered with, or holding code)."""


# ---------------------------------------------------------------- checksums


def crc32_file(path: Path) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


class _ChecksumWriter:
    """A write-only file that checksums what passes through it (torch.save writes through it)."""

    def __init__(self, f):
        self.f, self.crc, self.size = f, 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


def save_file(obj, path: str | Path) -> tuple[int, str]:
    """torch.save OBJ to PATH, checksummed while writing, and on disk before it returns (fsync:
    `latest` moves only to files that survive a node crash). Returns (size, crc32)."""
    with open(path, "wb") as f:
        writer = _ChecksumWriter(f)
        torch.save(obj, writer)
        f.flush()
        os.fsync(f.fileno())
    return writer.size, f"{writer.crc:08x}"


# ---------------------------------------------------------------- manifest


def write_manifest(tag_dir: Path, written: dict[str, tuple[int, str]] | None = None) -> None:
    """manifest.json of every file under TAG_DIR. WRITTEN: checksums computed while writing
    (name -> (size, crc32)); any other file is read and checksummed here."""
    written = written or {}
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        name = str(p.relative_to(tag_dir))
        if not p.is_file() or name in (MANIFEST, MANIFEST + ".tmp"):
            continue
        size, crc = written.get(name) or crc32_file(p)
        if p.stat().st_size != size:  # written again after it was checksummed
            size, crc = crc32_file(p)
        files[name] = {"size": size, "crc32": crc}
    tmp = tag_dir / (MANIFEST + ".tmp")
    durable_write(
        tmp, json.dumps({"format": FORMAT, "checksum": "crc32", "files": files}, indent=1)
    )
    os.replace(tmp, tag_dir / MANIFEST)


def durable_write(path: Path, text: str) -> None:
    """Write TEXT to PATH and fsync it (then os.replace it into place)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make the renames inside directory PATH durable (POSIX: fsync of the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """The files a checkpoint directory must hold: size and (format 2) checksum of each."""

    def __init__(self, tag_dir: Path):
        self.tag_dir = Path(os.path.abspath(tag_dir))
        path = self.tag_dir / MANIFEST
        if not path.is_file():
            raise CheckpointRefused(f"{path} is missing (half-written checkpoint?)")
        try:
            files = json.loads(path.read_text())["files"]
            self.files = {
                str(name): meta if isinstance(meta, dict) else {"size": int(meta)}
                for name, meta in files.items()
            }
            for meta in self.files.values():
                int(meta["size"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointRefused(f"{path} is unreadable: {exc!r:.200}") from None
        self.has_checksums = all("crc32" in m for m in self.files.values())

    def check_sizes(self) -> str | None:
        """None when every listed file exists with its size (a stat per file), else what is not."""
        for name, meta in self.files.items():
            f = self.tag_dir / name
            if not f.is_file():
                return f"{f} is missing"
            if f.stat().st_size != meta["size"]:
                return f"{f} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        return None

    def check_file(self, path: Path) -> None:
        """Raise CheckpointRefused unless PATH is listed and its content matches (one read)."""
        name = str(Path(os.path.abspath(path)).relative_to(self.tag_dir))
        meta = self.files.get(name)
        if meta is None:
            raise CheckpointRefused(f"{self.tag_dir / name}: not listed in {MANIFEST}")
        size, crc = crc32_file(self.tag_dir / name)
        if size != meta["size"]:
            raise CheckpointRefused(
                f"{self.tag_dir / name}: {size} bytes, the manifest says {meta['size']}"
            )
        if "crc32" in meta and crc != meta["crc32"]:
            raise CheckpointRefused(
                f"{self.tag_dir / name}: content checksum {crc} differs from the manifest's "
                f"{meta['crc32']} (corrupted or replaced after it was saved)"
            )

    def check_files(self, names, workers: int = 4) -> str | None:
        """None when the listed files NAMES match their checksums (read in WORKERS threads),
        else the first problem."""
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(self.check_file, self.tag_dir / n) for n in names]
            for fut in futures:
                try:
                    fut.result()
                except CheckpointRefused as exc:
                    return str(exc)
        return None

    def check_contents(self, workers: int = 4) -> str | None:
        """None when every file's size and checksum match (files read in WORKERS threads)."""
        return self.check_sizes() or self.check_files(self.files, workers)

    def digest(self) -> str:
        """One checksum over every file's name, size and checksum: the checkpoint's content key."""
        text = json.dumps(self.files, sort_keys=True).encode()
        return f"{zlib.crc32(text):08x}-{len(self.files)}-{sum(m['size'] for m in self.files.values())}"


def verify(tag_dir: Path) -> str | None:
    """None when TAG_DIR's manifest lists files that all exist with their sizes, else what is
    wrong (cheap: one stat per file; contents are checked as each file is loaded)."""
    try:
        return Manifest(tag_dir).check_sizes()
    except CheckpointRefused as exc:
        return str(exc)


def verify_contents(tag_dir: Path, workers: int = 4) -> str | None:
    """As `verify`, and every file's checksum too (reads the whole checkpoint)."""
    try:
        return Manifest(tag_dir).check_contents(workers)
    except CheckpointRefused as exc:
        return str(exc)


# ---------------------------------------------------------------- loading without code


def _safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19's ZeRO-1 and bf16 optimizer checkpoints pickle. Each
    is a plain data holder: unpickling one sets attributes or calls a trivial constructor."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_allowed = False


def allow_checkpoint_types() -> None:
    """Add SAFE_GLOBALS to torch's weights-only allow-list (once per process)."""
    global _allowed
    if not _allowed:
        torch.serialization.add_safe_globals(_safe_globals())
        _allowed = True


def forbid_code_in_loads() -> None:
    """Every torch.load in this process and its children is weights-only, whatever its caller
    asked (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD, read at each call), with our allow-list."""
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    allow_checkpoint_types()


def _refusal(path: Path, exc: Exception) -> CheckpointRefused:
    text = str(exc)
    unsupported = [line.strip() for line in text.splitlines() if "Unsupported" in line]
    why = (unsupported[0] if unsupported else text.strip().splitlines()[0] if text else "")[:300]
    return CheckpointRefused(
        f"{path}: refused: it does not unpickle as tensors and plain data ({why}); a megatron-ext "
        "or DeepSpeed checkpoint file holds no code"
    )


def load_file(path: str | Path, manifest: Manifest | None, map_location=None):
    """torch.load(PATH, weights_only=True) after checking its content against MANIFEST (when
    given). CheckpointRefused names the file when either check fails."""
    path = Path(path)
    allow_checkpoint_types()
    if manifest is not None:
        manifest.check_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except RuntimeError as exc:
        if "weights_only" in str(exc) or "Unsupported" in str(exc):
            raise _refusal(path, exc) from None
        raise


def _tag_dir_of(path: Path) -> Path | None:
    """PATH's directory when it holds a manifest (a trainer checkpoint), else None (a universal
    checkpoint converted here: weights-only loading, no checksums)."""
    return path.parent if (path.parent / MANIFEST).is_file() else None


def checkpoint_engine():
    """DeepSpeed's checkpoint engine with checksums written while saving and checked before each
    load, and weights-only unpickling. Install: `ds_engine.checkpoint_engine = checkpoint_engine()`
    (DeepSpeed reads the attribute at each save and load)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class ChecksummedCheckpointEngine(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(None)
            self.written: dict[str, tuple[int, str]] = {}  # absolute path -> (size, crc32)
            self._lock = threading.Lock()  # `write` may run in a background writer thread
            self._manifests: dict[Path, Manifest] = {}
            # checkpoint.async_save: a training/async_checkpoint.BackgroundWriter; `save` then
            # snapshots the state to host memory and returns, the writer thread calls `write`
            self.background = None

        def save(self, state_dict, path: str) -> None:
            if self.background is not None:
                self.background.submit(state_dict, path)
            else:
                self.write(state_dict, path)

        def write(self, state_dict, path: str) -> None:
            checksum = save_file(state_dict, path)
            with self._lock:
                self.written[os.path.abspath(path)] = checksum

        def preserves_storage_sharing(self) -> bool:
            # DeepSpeed then clones every layer's state (on the device) before `save`, so that
            # torch.save keeps views small; the asynchronous snapshot copies each tensor anyway
            return self.background is None

        def take_written(self, tag_dir: Path) -> dict[str, tuple[int, str]]:
            """The checksums of files saved under TAG_DIR since the last call, by relative name."""
            tag_dir = Path(os.path.abspath(tag_dir))
            out = {}
            with self._lock:
                for path in list(self.written):
                    if Path(path).is_relative_to(tag_dir):
                        out[str(Path(path).relative_to(tag_dir))] = self.written.pop(path)
            return out

        def manifest(self, tag_dir: Path) -> Manifest:
            """TAG_DIR's manifest, read once until `forget_manifests`."""
            tag_dir = Path(os.path.abspath(tag_dir))
            if tag_dir not in self._manifests:
                self._manifests[tag_dir] = Manifest(tag_dir)
            return self._manifests[tag_dir]

        def load(self, path: str, map_location=None):
            path_p = Path(os.path.abspath(path))
            tag_dir = _tag_dir_of(path_p)
            manifest = None if tag_dir is None else self.manifest(tag_dir)
            return load_file(path_p, manifest, map_location)

        def forget_manifests(self) -> None:
            self._manifests.clear()

    return ChecksummedCheckpointEngine()


# ---------------------------------------------------------------- names and layout
# <root>/latest                  the tag of the newest complete checkpoint
# <root>/iter_XXXXXXX/           one checkpoint (a "tag"), see training/checkpointing.py
#   layer_LL-model_TT-model_states.pt   DeepSpeed's pipeline layer LL at tp rank TT
#   mp_rank_MM_model_states.pt          engine + our client state, MM = pp_rank * tp + tp_rank
#   [bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt   ZeRO-1 optimizer shard of dp rank D
#   rng_rank{R}.pt, config.yaml, manifest.json

TAG_RE = re.compile(r"^iter_(\d{7})$")
LATEST = "latest"
# a layout change converts <tag> to <tag>_universal (DeepSpeed's universal checkpoint), named
# by `latest_universal`
UNIVERSAL_SUFFIX = "_universal"
LATEST_UNIVERSAL = "latest_universal"
UNIVERSAL_COMPLETE = "complete.json"  # written last by the conversion (convert/to_universal.py)


def universal_complete(root: Path, tag: str) -> bool:
    """Whether `<tag>_universal` under ROOT is a finished conversion of TAG."""
    return (Path(root) / f"{tag}{UNIVERSAL_SUFFIX}" / UNIVERSAL_COMPLETE).is_file()


def tag_of(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def layer_file(tag_dir: Path, layer: int, tp_rank: int) -> Path:
    return Path(tag_dir) / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file(tag_dir: Path, mp_rank: int) -> Path:
    return Path(tag_dir) / f"mp_rank_{mp_rank:02d}_model_states.pt"


def is_mp_rank_file(name: str) -> bool:
    return name.startswith("mp_rank_") and name.endswith("_model_states.pt")


def write_latest(root: Path, tag: str, name: str = LATEST) -> None:
    """Point NAME at TAG, durably: the tag's rename before it and this file reach the disk."""
    tmp = root / f".{name}.tmp"
    durable_write(tmp, tag)
    os.replace(tmp, root / name)
    fsync_dir(root)


def list_checkpoints(root: Path) -> list[str]:
    """Complete-looking tags (iter_XXXXXXX directories), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def candidates(root: Path) -> list[str]:
    """Tags to try, newest first: `latest` first, then older complete checkpoints."""
    tags = list_checkpoints(root)[::-1]
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if name in tags:
            tags.remove(name)
            tags.insert(0, name)
    return tags


def _available(root: Path) -> str:
    tags = sorted(p.name for p in root.glob("iter_*") if p.is_dir())
    return ", ".join(tags) if tags else "none"


def resolve_tag_dir(path: str | Path, iteration: int | None = None) -> Path:
    """A checkpoint root (with `latest`, or `iteration` given) or a tag directory -> the tag
    directory. Errors name the path and list the iterations that exist."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: checkpoint directory not found")
    if iteration is not None:
        tag_dir = p / tag_of(iteration)
        if not tag_dir.is_dir():
            raise UserError(f"{tag_dir}: no iteration {iteration} here (found: {_available(p)})")
        return tag_dir
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        if not tag or not (p / tag).is_dir():
            raise UserError(f"{p / 'latest'} names {tag!r}, which does not exist under {p}")
        return p / tag
    if any(p.glob("layer_*-model_*-model_states.pt")):
        return p
    if any(p.glob("iter_*")):
        raise UserError(f"{p / 'latest'} is missing; give --iteration N (found: {_available(p)})")
    raise UserError(
        f"{p}: neither a checkpoint root with a `latest` file nor a tag directory with "
        "layer_XX-model_YY-model_states.pt files"
    )


def universal_info(model) -> dict:
    """client_state["universal_checkpoint_info"]: how each of our parameters is split over TP.

    Only patterns that match a parameter of this model (the converter's strict mode rejects
    unused ones)."""
    from deepspeed.checkpoint import constants as c

    replicated = [r".*norm\.weight$"]
    if model.norm == "layernorm":
        replicated.append(r".*norm\.bias$")
    if model.tied_embeddings:  # the final norm is a pipeline layer of its own: "<layer>.weight"
        replicated.append(r"^\d+\.weight$")
        if model.norm == "layernorm":
            replicated.append(r"^\d+\.bias$")
    if model.bias:
        replicated += [r".*linear_proj\.bias$", r".*linear_fc2\.bias$"]
    if model.position_embedding == "learned":
        replicated.append(r".*position_embeddings$")
    info = {
        c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        c.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        # vocabulary rows are padded per TP size: merged without padding, re-padded on load
        c.VOCABULARY_PARAMETER_PATTERNS: [r".*word_embeddings\.weight$"]
        + ([] if model.tied_embeddings else [r".*output_layer\.weight$"]),
        c.ORIGINAL_VOCAB_SIZE: model.vocab_size,
        c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [
            r".*linear_proj\.weight$",
            r".*linear_fc2\.weight$",
        ],
    }
    if model.activation == "swiglu":  # each TP shard is [gate_r; up_r]
        info["parameter_with_2_sub_params_cat_dim_0"] = [r".*linear_fc1\.weight$"]
    return info
