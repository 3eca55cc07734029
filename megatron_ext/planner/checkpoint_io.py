"""How big a run's checkpoint is and how long saving it takes, against the Slurm signal margin.

Bytes per parameter of a DeepSpeed ZeRO-1 checkpoint (the same Precision table as the memory
estimate): the module weights in the training dtype (2 bytes bf16/fp16, 4 fp32), the fp32
master partition (4) and Adam's two moments (8): 14 bytes under bf16. BLOOM-176B (176.2B
parameters with its padded vocabulary): 2.47e12 bytes = 2.24 TiB, the "2.3 TB" reported for
its checkpoints with optimizer states (../shared/notes/field-facts.md). Norms and biases are
saved on every TP rank; counted once here (under 0.1% of a large model; a few % of the tiny
test models: test_checkpoint_scale.py checks the estimate against a real checkpoint).

The save time is the checkpoint size over a filesystem write bandwidth the caller states (the
profile's `filesystem_write_gb_s`, `--filesystem-gb-s` for `train --dry-run`): what one job
gets on a shared parallel filesystem is far below its aggregate peak; measure yours with the
first save's log line ("saved checkpoint ... in S s").
"""

from __future__ import annotations

from megatron_ext.models.config import ModelConfig
from megatron_ext.planner.memory import PRECISIONS

DEFAULT_FILESYSTEM_GB_S = 10.0  # a conservative per-job Lustre/GPFS write bandwidth


def checkpoint_bytes(model: ModelConfig, tp: int, precision: str) -> int:
    """Bytes of one checkpoint (weights, fp32 master, Adam moments) of MODEL at TP."""
    from megatron_ext.models.model import count_parameters

    prec = PRECISIONS[precision]
    params = count_parameters(model, tp)["num_parameters_padded"]
    return params * (prec.param_bytes + prec.master_bytes + prec.optim_bytes)


def save_report(
    size: int, filesystem_gb_s: float, signal_margin_s: float, save_timeout_s: float
) -> dict:
    """The expected save time of SIZE bytes and what it means for the run."""
    save_s = size / (filesystem_gb_s * 1e9)
    warnings = []
    if signal_margin_s and save_s > 0.8 * signal_margin_s:
        warnings.append(
            f"a save takes ~{save_s:.0f} s at {filesystem_gb_s:g} GB/s, more than 80% of the "
            f"{signal_margin_s:g} s Slurm signal margin: the save the time-limit signal asks for "
            "may not finish before the kill; raise signal_margin_s (slurm render "
            "--signal-margin-s)"
        )
    if save_s > 0.8 * save_timeout_s:
        warnings.append(
            f"a save takes ~{save_s:.0f} s, more than 80% of checkpoint.save_timeout_s="
            f"{save_timeout_s:g}; raise it"
        )
    return {
        "bytes": size,
        "gb": round(size / 1e9, 3),
        "filesystem_gb_s": filesystem_gb_s,
        "save_s": round(save_s, 1),
        "signal_margin_s": signal_margin_s,
        "save_timeout_s": save_timeout_s,
        "warnings": warnings,
    }
