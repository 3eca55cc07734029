"""Fused ops with pure-PyTorch references, selected per call or process-wide.

Each op `f` has `f_reference` beside it (plain torch ops, the definition of what `f` computes)
and runs compiled kernels when `megatron_ext._ops_cpu` / `megatron_ext._ops_cuda` are built
(ahead of time, by setup.py). A missing build falls back to the reference with one warning.
Choose per call with `use_fused=`, or process-wide with `set_use_fused`; `fused_ops_status()`
says which backend each op uses.
"""

from megatron_ext.ops._backend import fused_ops_status, get_use_fused, set_use_fused
from megatron_ext.ops.gelu import bias_gelu, bias_gelu_reference
from megatron_ext.ops.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from megatron_ext.ops.rotary import apply_rotary, apply_rotary_reference
from megatron_ext.ops.softmax import scaled_alibi_softmax, scaled_alibi_softmax_reference

__all__ = [
    "apply_rotary",
    "apply_rotary_reference",
    "bias_gelu",
    "bias_gelu_reference",
    "fused_ops_status",
    "get_use_fused",
    "layer_norm",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "scaled_alibi_softmax",
    "scaled_alibi_softmax_reference",
    "set_use_fused",
]
