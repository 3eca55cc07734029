"""Training metrics: console (rank 0), `<checkpoint.dir>/metrics.jsonl`, TensorBoard, and a
loss-curve PNG made from the JSONL file.

One JSON object per logged step: step, loss, lr, grad_norm, loss_scale, tokens_per_s,
tflops_per_device (model FLOPs), hw_tflops_per_device (counting recomputation, Megatron's
convention), mfu and hfu (against the device's bf16 peak; None on CPU unless
`logging.peak_tflops` is set; formulas in megatron_ext.training.flops), peak_memory_gb,
consumed_samples, skipped (non-finite loss); validation rows carry `val_loss` and `val_ppl`. On Linux also
peak_rss_mb (rank 0's peak resident set since just before the model was built, MiB) and
baseline_rss_mb (its resident set at that moment: torch, DeepSpeed, the process group), which the
planner's memory validation compares with its estimate.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

from megatron_ext.log import get_logger

log = get_logger(__name__)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _status_kib(field: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in KiB; None where there is no procfs."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def start_rss_tracking() -> float | None:
    """Resident set now (MiB), with the peak (VmHWM) reset to it, so `peak_rss_mb` afterwards
    is the peak since this call (Linux >= 4.0: `5` in clear_refs); None off Linux."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass  # then the peak also covers what came before (imports are smaller than training)
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mb() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


class MetricsWriter:
    """Writes rows on rank 0 only (all ranks may call it). Resuming truncates rows after
    `resume_step` so the file holds one row per step."""

    def __init__(self, out_dir: str, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if self.path.is_file() else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])
        parts = [f"step {row['step']}"]
        keys = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu")
        for key in keys:
            if row.get(key) is not None:
                parts.append(f"{key} {row[key]:.4g}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(jsonl: str | Path, png: str | Path) -> Path:
    """Training (and validation, when logged) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return Path(png)
