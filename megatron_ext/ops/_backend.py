"""Which implementation an op call runs: the compiled kernels or the PyTorch reference.

Kernels are compiled ahead of time by `setup.py` into `megatron_ext._ops_cpu` (always) and
`megatron_ext._ops_cuda` (CUDA or ROCm torch). Nothing is compiled here. When the module for a
tensor's device is missing, the ops run their reference and one warning per module says so.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

OPS = ("scaled_alibi_softmax", "bias_gelu", "layer_norm", "rms_norm", "apply_rotary")
_MODULES = {"cpu": "megatron_ext._ops_cpu", "cuda": "megatron_ext._ops_cuda"}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_use_fused = True
_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}
_warned: set[str] = set()


def set_use_fused(enabled: bool) -> None:
    """Process-wide default for the ops' `use_fused` argument (True unless changed)."""
    global _use_fused
    _use_fused = bool(enabled)


def get_use_fused() -> bool:
    return _use_fused


def _load(device_type: str) -> ModuleType | None:
    if device_type not in _loaded:
        try:
            _loaded[device_type] = importlib.import_module(_MODULES[device_type])
        except ImportError as exc:
            _loaded[device_type] = None
            _errors[device_type] = str(exc)
    return _loaded[device_type]


def _warn_missing(device_type: str) -> None:
    if device_type in _warned:
        return
    _warned.add(device_type)
    warnings.warn(
        f"megatron-ext fused ops: {_MODULES[device_type]} is not built "
        f"({_errors.get(device_type, 'not found')}); {device_type} tensors use the PyTorch "
        "reference ops (slower). Build it with `pip install --no-build-isolation -e .` "
        "(or `python setup.py build_ext --inplace`) from the repository root.",
        RuntimeWarning,
        stacklevel=4,
    )


def kernels_for(x: torch.Tensor, use_fused: bool | None) -> ModuleType | None:
    """The kernel module to run on `x`, or None for the reference.

    None also for dtypes the kernels do not cover (float64, used by gradcheck), without warning.
    """
    if not (_use_fused if use_fused is None else use_fused):
        return None
    if x.dtype not in _KERNEL_DTYPES or x.device.type not in _MODULES:
        return None
    module = _load(x.device.type)
    if module is None:
        _warn_missing(x.device.type)
    return module


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs (the references' arithmetic), float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _gpu_backend_name() -> str:
    return "hip" if torch.version.hip else "cuda"


def fused_ops_status() -> dict[str, dict[str, str]]:
    """For each op, the backend used on CPU and on GPU tensors: cpu, cuda, hip or reference.

    Reflects the process-wide switch (`set_use_fused`) and which kernel modules were built.
    """
    cpu = "cpu" if _use_fused and _load("cpu") is not None else "reference"
    gpu = _gpu_backend_name() if _use_fused and _load("cuda") is not None else "reference"
    return {op: {"cpu": cpu, "gpu": gpu} for op in OPS}


def build_errors() -> dict[str, str]:
    """Why a kernel module failed to import, by device type (empty when all loaded)."""
    for device_type in _MODULES:
        _load(device_type)
    return dict(_errors)
