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

TensorBoard and, with `logging.wandb.project` set, Weights & Biases get each row's finite numeric
values as `train/<key>` at the row's step.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import resource
import secrets
import string
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

if TYPE_CHECKING:
    from megatron_ext.training.config import WandbConfig

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
    `resume_step` so the file holds one row per step (TensorBoard: purge_step). `wandb`: a
    WandbConfig; with its project set the W&B run starts here, so a W&B that cannot start
    stops the run at start-up (UserError), not after hours of training."""

    def __init__(
        self,
        out_dir: str,
        enabled: bool,
        tensorboard: bool,
        resume_step: int = 0,
        wandb: WandbConfig | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if self.path.is_file() else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None and wandb.project and wandb.mode != "disabled":
            self.wandb = start_wandb(wandb, Path(out_dir), resume_step)
            # a resumed online run already holds these steps: W&B keeps only increasing ones
            self._wandb_from = self.wandb.starting_step

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {
            f"train/{key}": value
            for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)
        }
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, row["step"])
        if self.wandb is not None and row["step"] >= self._wandb_from:
            self.wandb.log(scalars, step=row["step"])
        parts = [f"step {row['step']}"]
        keys = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu")
        for key in keys:
            if row.get(key) is not None:
                parts.append(f"{key} {row[key]:.4g}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            self.wandb = None
            wandb.teardown()  # stops wandb's service process: nothing is left running


WANDB_RUN_ID = "wandb/run_id"  # under checkpoint.dir


def start_wandb(cfg: WandbConfig, checkpoint_dir: Path, resume_step: int):
    """The W&B run of a training run (rank 0): a new one from step 0, else the one whose id is in
    CHECKPOINT_DIR/wandb/run_id (resume="allow"). Offline never reaches the network: WANDB_MODE
    is set before wandb reads its settings, which also keeps its telemetry off."""
    os.environ["WANDB_MODE"] = cfg.mode
    if cfg.mode == "online":
        _check_wandb_credentials()
    try:
        import wandb
    except ImportError:
        raise UserError(
            "logging.wandb.project is set but wandb is not installed: pip install -c "
            "constraints.txt wandb, or remove logging.wandb.project"
        ) from None
    id_file = checkpoint_dir / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if resume_step and id_file.is_file() else None
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    root = Path(cfg.dir) if cfg.dir else checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            project=cfg.project,
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=str(root),
            mode=cfg.mode,
            settings=wandb.Settings(console="off"),  # our log stays ours: no stdout wrapping
        )
    except wandb.errors.Error as exc:
        raise UserError(
            f"logging.wandb (mode {cfg.mode}, run id {run_id} from {id_file}): W&B did not "
            f"start: {exc}; without network use logging.wandb.mode=offline and `wandb sync` later"
        ) from None
    log.info("W&B run %s (%s) in %s", run_id, cfg.mode, root / "wandb")
    return run


def _check_wandb_credentials() -> None:
    """Online mode without credentials would prompt on a terminal or fail deep inside
    wandb.init; refuse before that, saying how to give them."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UserError(
        f"logging.wandb.mode=online needs W&B credentials for {host}: set WANDB_API_KEY or run "
        f"`wandb login` once (it writes {path}); where there is no network, use "
        "logging.wandb.mode=offline and upload later with `wandb sync`"
    )


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
