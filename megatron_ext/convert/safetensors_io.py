"""Streaming Hugging Face checkpoint I/O: one tensor in memory at a time, atomic output.

Writing: the shard plan (names, dtypes, shapes) is known before any data is written (the
driver computes it on meta tensors), so every `model-0000X-of-0000N.safetensors` header is
written first and each tensor goes straight to its offset. Output goes to a hidden temp
directory next to the final one, renamed on success: a failed conversion leaves nothing under
the final name.

Reading: `HFCheckpoint` opens safetensors lazily per tensor (`safe_open`) and reads
`pytorch_model*.bin` only through `torch.load(weights_only=True, mmap=True)`; a pickle that
needs arbitrary unpickling is refused (unpickling can run code). Input is not trusted: every
file an index names must lie inside the model directory (symlinks resolved), and each
safetensors header is checked against its file (length, dtypes, shapes, byte ranges) before
anything is read through it; every failure is a UserError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megatron_ext.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes (HF's decimal units; GiB/MiB binary)."""
    if isinstance(text, int):
        return text
    s = text.strip().upper()
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3}
    for unit, factor in units.items():
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    try:
        return int(s.rstrip("B"))
    except ValueError:
        raise UserError(f"--max-shard-size {text!r}: give bytes or e.g. 5GB, 500MB") from None


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy in order, as transformers does: a tensor larger than the limit gets its own shard."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


@contextlib.contextmanager
def atomic_output_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; rename it to `final` on success, delete it on error."""
    final = Path(final)
    if final.exists():
        raise UserError(f"{final} already exists; remove it or choose another output directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, final)


def _header(specs: Sequence[TensorSpec]) -> tuple[bytes, dict[str, int]]:
    meta: dict = {"__metadata__": {"format": "pt"}}
    offsets, pos = {}, 0
    for spec in specs:
        meta[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [pos, pos + spec.nbytes],
        }
        offsets[spec.name] = pos
        pos += spec.nbytes
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text, offsets


class ShardedSafetensorsWriter:
    """Writes planned tensors in any order into HF-style shards inside `directory`.

    `write(name, tensor)` checks dtype/shape against the plan; `finish()` checks every tensor
    was written and writes the index (single shard: `model.safetensors`, no index, as HF).
    """

    def __init__(self, directory: Path, specs: Sequence[TensorSpec], max_shard_size: int):
        self.directory, self.specs = Path(directory), {s.name: s for s in specs}
        shards = plan_shards(specs, max_shard_size)
        n = len(shards)
        self.files: list[str] = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.where: dict[str, tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self.handles = []
        for i, shard in enumerate(shards):
            header, offsets = _header(shard)
            f = open(self.directory / self.files[i], "w+b")  # noqa: SIM115 - closed in finish
            f.write(header)
            f.truncate(len(header) + sum(s.nbytes for s in shard))
            self.handles.append(f)
            self.where.update({name: (i, len(header) + off) for name, off in offsets.items()})
        self.written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        if spec is None or name in self.written:
            raise RuntimeError(
                f"tensor {name} is not planned for this checkpoint or was written twice"
            )
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(
                f"tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, planned "
                f"{spec.dtype} {spec.shape}"
            )
        shard, offset = self.where[name]
        f = self.handles[shard]
        f.seek(offset)
        # A uint8 view of the tensor's own memory: no copy on the way to the file.
        f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        self.written.add(name)

    def finish(self) -> None:
        for f in self.handles:
            f.close()
        missing = set(self.specs) - self.written
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors never written, e.g. {min(missing)}")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.specs.values())},
                "weight_map": {n: self.files[self.where[n][0]] for n in self.specs},
            }
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def _not_safetensors(path: Path, why: str) -> UserError:
    return UserError(
        f"{path}: not a valid safetensors file: {why}; re-download or re-save it (a header that "
        "disagrees with the file is never read past)"
    )


def _read_header_json(path: Path) -> tuple[dict, int]:
    """The header object of a safetensors file and the size of its data section in bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _not_safetensors(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _not_safetensors(path, f"header length {n} exceeds the file ({size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise _not_safetensors(path, f"the header is not JSON ({str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    meta.pop("__metadata__", None)
    return meta, size - 8 - n


def _sizes(value, length: int | None = None) -> bool:
    """A JSON list of non-negative integers (of `length` items when given)."""
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(type(x) is int and x >= 0 for x in value)
    )


def _header_entry(path: Path, name: str, entry, data_size: int) -> tuple[TensorSpec, int, int]:
    """One tensor's spec and byte range [begin, end) within the data section, checked."""
    if not isinstance(entry, dict):
        raise _not_safetensors(path, f"tensor {name}: entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        known = ", ".join(DTYPES)
        raise _not_safetensors(path, f"tensor {name}: dtype {dtype!r} is not one of {known}")
    if not _sizes(shape):
        raise _not_safetensors(path, f"tensor {name}: shape {shape!r} is not a list of sizes")
    if not _sizes(offsets, 2) or not offsets[0] <= offsets[1] <= data_size:
        raise _not_safetensors(
            path, f"tensor {name}: data_offsets {offsets!r} outside the data ({data_size} bytes)"
        )
    spec = TensorSpec(name, DTYPES[dtype], tuple(shape))
    if offsets[1] - offsets[0] != spec.nbytes:
        raise _not_safetensors(
            path,
            f"tensor {name}: {dtype} {list(shape)} needs {spec.nbytes} bytes, data_offsets "
            f"{offsets} hold {offsets[1] - offsets[0]}",
        )
    return spec, offsets[0], offsets[1]


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    """Names, dtypes and shapes of a safetensors file, checked as the safetensors library checks
    them: the header lies inside the file, each tensor's byte range lies inside the data and is
    as long as its dtype and shape need, and the ranges tile the data section."""
    path = Path(path)
    meta, data_size = _read_header_json(path)
    entries = [_header_entry(path, name, entry, data_size) for name, entry in meta.items()]
    end = 0
    for spec, begin, stop in sorted(entries, key=lambda e: (e[1], e[2])):
        if begin != end:
            raise _not_safetensors(
                path, f"tensor {spec.name} starts at byte {begin} of the data, expected {end}"
            )
        end = stop
    if end != data_size:
        raise _not_safetensors(path, f"tensors cover {end} of the {data_size} data bytes")
    return {spec.name: spec for spec, _, _ in entries}


def load_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """torch.load restricted to tensors and plain containers, memory-mapped (lazy)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(
            f"{path}: refused: this pickle needs arbitrary unpickling, which can run code "
            f"({first}). Convert it to safetensors with a trusted tool, or re-save a plain "
            "state dict of tensors with torch.save"
        ) from None
    except (RuntimeError, EOFError) as exc:
        text = str(exc)
        if "mmap can only be used" in text:
            raise UserError(
                f"{path}: legacy (pre-zip) torch.save format, or not a torch.save file at all: "
                "it cannot be memory-mapped; re-save it with a current torch.save or convert it "
                "to safetensors"
            ) from None
        if isinstance(exc, RuntimeError) and "PytorchStreamReader" not in text:
            raise
        raise UserError(
            f"{path}: corrupt or truncated torch.save file ({text.splitlines()[0][:200]}); "
            "re-download or re-save it"
        ) from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model*.bin`: weights-only, and checked to be {tensor name: tensor}."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(
            f"{path}: not a state dict (a dict of tensor name -> tensor); give the weights "
            "file transformers' save_pretrained writes"
        )
    return state


def confined(directory: Path, entry: str, where: Path) -> Path:
    """directory/entry with symlinks resolved, which must be a file inside `directory` (or, for
    a Hugging Face hub cache snapshot, in that repository's blobs/, where its links point).
    UserError naming `where` (the index, or the file itself) and the entry otherwise."""
    root = directory.resolve()
    roots = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    try:
        path = (directory / entry).resolve()
        is_file = path.is_file()
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: entry {entry!r} is not a usable file name ({exc})") from None
    if not any(path.is_relative_to(r) for r in roots):
        raise UserError(
            f"{where}: entry {entry!r} points outside {directory} (to {path}); the weights must "
            "lie inside the model directory"
        )
    if not is_file:
        raise UserError(f"{where}: entry {entry!r}: {path} is missing")
    return path


def read_json_object(path: Path, fix: str, what: str = "") -> dict:
    """A JSON file holding an object; UserError naming PATH otherwise (FIX says what to do,
    WHAT what the object should be)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({str(exc)[:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object{what}; {fix}")
    return data


def read_weight_map(directory: Path, index: Path) -> dict[str, Path]:
    """tensor name -> file of a `*.index.json`, every file confined to `directory`."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{index}: not a readable JSON index ({str(exc)[:200]})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise UserError(f'{index}: no "weight_map" object of tensor name -> file name')
    files = {f: confined(directory, f, index) for f in sorted(set(weight_map.values()))}
    return {name: files[f] for name, f in weight_map.items()}


class HFCheckpoint:
    """Lazy tensors of a HF model directory (safetensors preferred, else pytorch_model*.bin).

    Every weights file lies inside the directory (index entries are confined to it), and
    `source` is the file that lists the tensors (the index, or the single weights file).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = d = Path(directory)
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give a Hugging Face model directory")
        self.kind, self.source, self.file_of = self._discover(d)

    @staticmethod
    def _discover(d: Path) -> tuple[str, Path, dict[str, Path]]:
        for kind, single, index in (
            ("safetensors", "model.safetensors", INDEX_NAME),
            ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            if (d / index).is_file():
                return kind, d / index, read_weight_map(d, d / index)
            if (d / single).is_file():
                path = confined(d, single, d / single)
                if kind == "safetensors":
                    names = read_safetensors_header(path)
                else:
                    names = load_state_dict_file(path)
                return kind, d / single, dict.fromkeys(names, path)
        raise UserError(
            f"{d}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json) found; "
            "is this a Hugging Face model directory?"
        )

    def keys(self) -> list[str]:
        return list(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def _path(self, name: str) -> Path:
        if name not in self.file_of:
            raise UserError(f"{self.source}: checkpoint has no tensor {name}")
        return self.file_of[name]

    def _file_specs(self, path: Path) -> dict[str, TensorSpec]:
        if self.kind == "safetensors":
            return read_safetensors_header(path)
        sd = load_state_dict_file(path)
        return {k: TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in sd.items()}

    def specs(self) -> dict[str, TensorSpec]:
        """Every listed tensor's spec, from checked headers; UserError naming the index when a
        file lacks a tensor the index puts there."""
        out: dict[str, TensorSpec] = {}
        for path in dict.fromkeys(self.file_of.values()):
            out.update(self._file_specs(path))
        for name, path in self.file_of.items():
            if name not in out:
                raise UserError(
                    f"{self.source}: lists tensor {name} in {path.name}, which has no such tensor"
                )
        return {k: out[k] for k in self.file_of}

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now (the file is opened and closed around it)."""
        path = self._path(name)
        if self.kind == "safetensors":
            try:
                with safe_open(path, framework="pt") as f:
                    return f.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise UserError(f"{path}: cannot read tensor {name} ({exc})") from None
        sd = load_state_dict_file(path)
        if name not in sd:
            raise UserError(f"{self.source}: lists tensor {name} in {path}, which lacks it")
        return sd[name].clone()  # a private copy; the mapping closes with `sd`
