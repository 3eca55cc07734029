"""Streaming Hugging Face checkpoint I/O: one tensor in memory at a time, atomic output.

Writing: the shard plan (names, dtypes, shapes) is known before any data is written (the
driver computes it on meta tensors), so every `model-0000X-of-0000N.safetensors` header is
written first and each tensor goes straight to its offset. Output goes to a hidden temp
directory next to the final one, renamed on success: a failed conversion leaves nothing under
the final name.

Reading: `HFCheckpoint` opens safetensors lazily per tensor (`safe_open`) and reads
`pytorch_model*.bin` only through `torch.load(weights_only=True, mmap=True)`; a pickle that
needs arbitrary unpickling is refused (unpickling can run code).
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
from safetensors import safe_open

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


def read_safetensors_header(path: Path) -> dict[str, TensorSpec]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))
    meta.pop("__metadata__", None)
    return {k: TensorSpec(k, DTYPES[v["dtype"]], tuple(v["shape"])) for k, v in meta.items()}


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
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise
        raise UserError(
            f"{path}: legacy (pre-zip) torch.save format cannot be memory-mapped; re-save it "
            "with a current torch.save or convert it to safetensors"
        ) from None


class HFCheckpoint:
    """Lazy tensors of a HF model directory (safetensors preferred, else pytorch_model*.bin)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = d = Path(directory)
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give a Hugging Face model directory")
        self.kind, self.file_of = self._discover(d)

    @staticmethod
    def _discover(d: Path) -> tuple[str, dict[str, Path]]:
        for kind, single, index in (
            ("safetensors", "model.safetensors", INDEX_NAME),
            ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
        ):
            if (d / index).is_file():
                weight_map = json.loads((d / index).read_text())["weight_map"]
                return kind, {k: d / f for k, f in weight_map.items()}
            if (d / single).is_file():
                if kind == "safetensors":
                    names = read_safetensors_header(d / single)
                else:
                    names = load_weights_only(d / single)
                return kind, dict.fromkeys(names, d / single)
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
            raise UserError(f"{self.directory}: checkpoint has no tensor {name}")
        return self.file_of[name]

    def specs(self) -> dict[str, TensorSpec]:
        out: dict[str, TensorSpec] = {}
        for path in dict.fromkeys(self.file_of.values()):
            if self.kind == "safetensors":
                out.update(read_safetensors_header(path))
            else:
                sd = load_weights_only(path)
                out.update({k: TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in sd.items()})
        return {k: out[k] for k in self.file_of}

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read now (the file is opened and closed around it)."""
        path = self._path(name)
        if self.kind == "safetensors":
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        sd = load_weights_only(path)
        return sd[name].clone()  # a private copy; the mapping closes with `sd`
