"""The run config: one YAML file (plus dotted overrides) holding every section of a run.

    model:      preset name and/or ModelConfig fields
    parallel:   tp, pp (dp = world size / (tp * pp))
    data:       path (one prefix) or blend (a blend YAML), seq_length, split, seed
    train:      iterations, micro/global batch size, precision, activation checkpointing
    optim:      AdamW, clipping, LR warmup + decay
    checkpoint: dir, interval, keep, load, reset_progress
    logging:    interval, eval, TensorBoard
    eval:       tasks run in the background on every K-th checkpoint (rank 0)

The resolved config is saved with every checkpoint (`config.yaml`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megatron_ext import config as config_io
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig

log = get_logger(__name__)


def _model_from_yaml(value: Any, where: str) -> ModelConfig:
    """`model:` of a run config: a preset name, or fields with an optional `preset` (expanded
    here, once; unknown fields refused with the known ones listed)."""
    from megatron_ext.models.presets import resolve_model_config  # imports torch: not at start

    if isinstance(value, (str, dict, ModelConfig)):
        return resolve_model_config(value, where)
    raise UserError(f"{where}: expected a preset name or a mapping of model fields")


config_io.register_coercer(ModelConfig, _model_from_yaml)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    partition_method: Literal["parameters", "uniform", "type"] = "parameters"


@dataclass
class DataConfig:
    path: str | None = None  # one dataset prefix
    blend: str | None = None  # or a blend YAML file
    seq_length: int = 2048
    split: str = "969,30,1"
    seed: int = 1234
    cache_dir: str | None = None  # default: <checkpoint.dir>/index-cache
    num_workers: int = 0  # DataLoader workers (spawned, never forked)


@dataclass
class SpikeConfig:
    """Loss-spike handling (training/spikes.py): a step whose loss or gradient norm is more than
    `sigma` standard deviations above the mean of the last `window` good steps is a spike (judged
    once half the window is filled); `action`: skip (no optimizer step for that batch), log
    (report only) or none. `max_spikes` spikes within `max_spikes_window` steps: save and stop
    (exit 3), naming the steps and their samples (0: never stop)."""

    action: Literal["skip", "log", "none"] = "skip"  # not "off": YAML reads that as false
    sigma: float = 6.0
    window: int = 128
    max_spikes: int = 4
    max_spikes_window: int = 128


@dataclass
class TrainConfig:
    iterations: int = 100
    micro_batch_size: int = 1
    global_batch_size: int = 8
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # bf16: the dtype gradients accumulate in across micro-batches (BLOOM: fp32, DeepSpeed's
    # BF16_Optimizer); "bf16" saves memory but rounds every micro-batch's sum
    grad_accum_dtype: Literal["fp32", "bf16"] = "fp32"
    # none; full: recompute every block in backward; every: every k-th block; selective: only
    # the attention core (scores, softmax, context: the s^2 activations), as Megatron's
    # --recompute-activations
    activation_checkpointing: Literal["none", "selective", "full", "every"] = "none"
    checkpoint_every_layers: int = 1  # with "every": recompute every k-th block
    seed: int = 1234
    rampup_batch_size: list[int] | None = None  # [start, increment, samples], as Megatron
    exit_duration_in_mins: float | None = None
    kill_switch_file: str | None = None
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    collective_timeout_s: float = 600.0
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    # [[start, end], ...]: global sample indices never trained on (end exclusive), in the
    # units of the sample stream (consumed_samples), whatever the batch size or dp
    skip_samples: list[list[int]] | None = None
    # a check of devices and links at start-up (training/preflight.py): all-reduce and
    # send/recv bandwidth below preflight_min_gbps (GB/s; None: 1 on GPUs, 0.01 on CPU) names
    # the slow rank and host
    preflight: bool = True
    preflight_min_gbps: float | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_iters: int = 0
    decay_iters: int | None = None  # default: train.iterations
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    initial_loss_scale: float = 2.0**16  # fp16 only (dynamic loss scaling)


@dataclass
class CheckpointConfig:
    dir: str = "checkpoints"
    interval: int = 100
    keep: int = 2  # keep the last K checkpoints (0: keep every checkpoint)
    load: str | None = None  # start from this checkpoint dir (default: resume from `dir`)
    reset_progress: bool = (
        False  # continued pretraining: weights only, new iteration/optim/schedule
    )
    # when `dir` holds checkpoints and none of them loads: move them to dir/set-aside-*/ and
    # start from step 1 (without it that is an error); a run whose checkpoint loads resumes
    start_over: bool = False
    # the collective timeout while a checkpoint is written (instead of train.collective_timeout_s):
    # a 176B save writes ~5.5 GB per rank, which a busy parallel filesystem can stretch past the
    # step timeout; `plan`/`--dry-run` print the expected save time
    save_timeout_s: float = 3600.0
    # write checkpoints in the background: training stalls only while each rank copies its part
    # to host memory (kept for reuse: one more checkpoint part per rank in host memory);
    # `latest` moves when every rank's part is on disk (training/async_checkpoint.py)
    async_save: bool = False


@dataclass
class WandbConfig:
    """Weights & Biases logging beside TensorBoard (rank 0; training/metrics.py): every row's
    numeric scalars as `train/<key>` at the row's step, the keys TensorBoard gets. Off while
    `project` is None (wandb is not imported then).

    mode: offline (default) writes DIR/wandb/offline-run-*/ and never touches the network
          (`wandb sync DIR/wandb/offline-run-*` uploads it later, from a node with network);
          online needs WANDB_API_KEY (or a `wandb login` entry in ~/.netrc) and a network;
          disabled is the same as no project
    dir:  the directory W&B writes its `wandb/` folder into (default: checkpoint.dir)
    A resumed run continues the W&B run whose id is in <checkpoint.dir>/wandb/run_id; a run
    that starts from step 0 begins a new one.
    """

    project: str | None = None
    name: str | None = None
    mode: Literal["online", "offline", "disabled"] = "offline"
    dir: str | None = None


@dataclass
class LoggingConfig:
    interval: int = 1
    eval_interval: int = 0  # 0: no validation during training
    eval_iters: int = 4
    tensorboard: bool = True
    # dense bf16 peak per device for MFU; None: by GPU name (A100 312, H100/H200 989, MI250X
    # GCD 191.5; training/flops.py), no MFU on CPU
    peak_tflops: float | None = None
    # every N steps each rank's forward/backward/communication/optimizer time is gathered and
    # the slowest ranks against their stage's median reported (metrics.jsonl "stragglers"); 0 off
    straggler_interval: int = 100
    # [first, last]: a torch.profiler trace of those steps in <checkpoint.dir>/profile/
    # (TensorBoard-readable; on GPUs also a CUDA memory snapshot), on profile_ranks (None: all)
    profile_steps: list[int] | None = None
    profile_ranks: list[int] | None = field(default_factory=lambda: [0])
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    """In-loop task evaluation: after every `every_checkpoints`-th checkpoint it saves, rank 0
    starts `megatron-ext eval` on that checkpoint's tag dir as a background process (training
    does not wait; one at a time, a checkpoint that comes while one runs is skipped). Results:
    ROOT/eval/iter_XXXXXXX.json (lm-eval's JSON), its output in ROOT/eval/iter_XXXXXXX.log, and
    one row per finished eval in ROOT/eval/summary.jsonl. At the end of training rank 0 waits up
    to `wait_at_end_s` for a running eval, then stops it.

    tasks:             comma-separated task names (bundled, BIG-bench under task_dir, lm-eval's)
    every_checkpoints: K; 0 turns in-loop evaluation off
    tokenizer:         the tokenizer dir the run was trained with (needed for the conversion)
    limit:             at most N examples per task (<1: a fraction); None: all
    task_dir:          a directory of BIG-bench task.json files (FIN-bench layout)
    include_path:      a directory of lm-eval task YAMLs (FIN-bench v2 format, local data files)
    num_fewshot, batch_size, device: passed to `megatron-ext eval` (device None: its default)
    """

    tasks: str = ""
    every_checkpoints: int = 0
    tokenizer: str | None = None
    limit: float | None = None
    task_dir: str | None = None
    include_path: str | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    device: Literal["cpu", "cuda"] | None = None
    wait_at_end_s: float = 600.0


@dataclass
class RunConfig:
    # resolved at load: every field (a preset expanded); seq_length follows data.seq_length
    model: ModelConfig = field(default_factory=lambda: _model_from_yaml("tiny", "model"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # the one place the model's sequence length is derived: the data's
        self.model.seq_length = self.data.seq_length

    def data_parallel_size(self, world_size: int) -> int:
        mp = self.parallel.tp * self.parallel.pp
        if world_size % mp:
            raise UserError(
                f"world size {world_size} is not divisible by tp x pp = {self.parallel.tp} x "
                f"{self.parallel.pp}; change parallel.tp/parallel.pp or the number of processes"
            )
        return world_size // mp

    def grad_accumulation_steps(self, dp_size: int) -> int:
        """Micro-batches per step at the full global batch (ramp-up, if any, checked too)."""
        check_rampup(self.train, dp_size)
        per_step = self.train.micro_batch_size * dp_size
        if self.train.global_batch_size % per_step:
            raise UserError(
                f"train.global_batch_size {self.train.global_batch_size} is not divisible by "
                f"micro_batch_size x dp = {self.train.micro_batch_size} x {dp_size}"
            )
        return self.train.global_batch_size // per_step

    def validate(self) -> None:
        if (self.data.path is None) == (self.data.blend is None):
            raise UserError(
                "give exactly one of data.path (a dataset prefix) or data.blend (a blend YAML)"
            )
        for name in ("tp", "pp"):
            if getattr(self.parallel, name) < 1:
                raise UserError(f"parallel.{name} must be at least 1")
        if self.train.iterations < 0 or self.train.micro_batch_size < 1:
            raise UserError("train.iterations must be >= 0 and train.micro_batch_size >= 1")
        if self.checkpoint.interval < 1:
            raise UserError("checkpoint.interval must be at least 1")
        self._validate_numbers()
        if self.checkpoint.reset_progress and not self.checkpoint.load:
            raise UserError(
                "checkpoint.reset_progress (--reset-progress) needs checkpoint.load: the "
                "checkpoint whose weights the continued pretraining starts from"
            )
        ev = self.eval
        if ev.every_checkpoints < 0:
            raise UserError("eval.every_checkpoints must be >= 0 (0: no in-loop evaluation)")
        if ev.every_checkpoints and not (ev.tasks.strip() and ev.tokenizer):
            raise UserError(
                "eval.every_checkpoints is set: give eval.tasks (comma-separated task names) "
                "and eval.tokenizer (the tokenizer dir the run was trained with)"
            )
        if ev.every_checkpoints and not Path(ev.tokenizer).is_dir():
            raise UserError(f"eval.tokenizer={ev.tokenizer}: not a directory")

    def _validate_numbers(self) -> None:
        """What a real run would otherwise fail on later with a traceback (or worse, run)."""
        t, o = self.train, self.optim
        checks = [
            (
                t.global_batch_size >= 1,
                f"train.global_batch_size={t.global_batch_size} must be >= 1",
            ),
            (math.isfinite(o.lr) and o.lr > 0, f"optim.lr={o.lr} must be a positive finite number"),
            (
                math.isfinite(o.min_lr) and 0 <= o.min_lr <= o.lr,
                f"optim.min_lr={o.min_lr} must be finite, between 0 and optim.lr={o.lr}",
            ),
            (self.logging.interval >= 1, f"logging.interval={self.logging.interval} must be >= 1"),
            (
                self.logging.straggler_interval >= 0,
                "logging.straggler_interval must be >= 0 (0: no straggler report)",
            ),
            (
                self.logging.profile_steps is None
                or (
                    len(self.logging.profile_steps) == 2
                    and 1 <= self.logging.profile_steps[0] <= self.logging.profile_steps[1]
                ),
                f"logging.profile_steps={self.logging.profile_steps}: give [first, last] steps, "
                "1 <= first <= last",
            ),
            (
                self.logging.eval_interval >= 0,
                "logging.eval_interval must be >= 0 (0: no validation)",
            ),
            (self.data.num_workers >= 0, f"data.num_workers={self.data.num_workers} must be >= 0"),
            (
                math.isfinite(t.collective_timeout_s) and t.collective_timeout_s > 0,
                f"train.collective_timeout_s={t.collective_timeout_s} must be a positive number",
            ),
            (self.checkpoint.keep >= 0, "checkpoint.keep must be >= 0 (0 keeps every checkpoint)"),
            (
                math.isfinite(self.checkpoint.save_timeout_s)
                and self.checkpoint.save_timeout_s > 0,
                f"checkpoint.save_timeout_s={self.checkpoint.save_timeout_s} must be a positive "
                "number",
            ),
            (self.data.seq_length >= 1, f"data.seq_length={self.data.seq_length} must be >= 1"),
            (
                math.isfinite(t.spikes.sigma) and t.spikes.sigma > 0 and t.spikes.window >= 4,
                f"train.spikes: sigma={t.spikes.sigma} must be > 0 and window={t.spikes.window} "
                ">= 4",
            ),
            (
                t.spikes.max_spikes >= 0 and t.spikes.max_spikes_window >= 1,
                "train.spikes: max_spikes must be >= 0 (0: never stop) and max_spikes_window >= 1",
            ),
            (
                t.preflight_min_gbps is None or t.preflight_min_gbps > 0,
                f"train.preflight_min_gbps={t.preflight_min_gbps} must be a positive number",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise UserError(f"run config: {what}")
        check_skip_samples(t.skip_samples)


def check_skip_samples(ranges: list[list[int]] | None) -> None:
    """train.skip_samples: [start, end] pairs, 0 <= start < end, sorted and not overlapping."""
    previous_end = 0
    for i, pair in enumerate(ranges or []):
        if len(pair) != 2 or not 0 <= pair[0] < pair[1] or pair[0] < previous_end:
            raise UserError(
                f"train.skip_samples[{i}]={pair}: give [start, end] global sample indices with "
                "0 <= start < end, the ranges sorted and not overlapping "
                f"(all of them: {ranges})"
            )
        previous_end = pair[1]


def check_rampup(train: TrainConfig, dp_size: int) -> None:
    """Refuse a ramp-up whose batch sizes are not whole micro-batches on every DP rank."""
    ramp = train.rampup_batch_size
    if not ramp:
        return
    if len(ramp) != 3 or min(ramp) < 1:
        raise UserError(
            f"train.rampup_batch_size={ramp}: give [start, increment, samples], all >= 1"
        )
    start, increment, _ = ramp
    gbs = train.global_batch_size
    if start > gbs or (gbs - start) % increment:
        raise UserError(
            f"train.rampup_batch_size={ramp}: start must be <= global_batch_size {gbs} and "
            f"global_batch_size - start a multiple of increment"
        )
    unit = train.micro_batch_size * dp_size
    if start % unit or increment % unit:
        raise UserError(
            f"train.rampup_batch_size={ramp}: start and increment must be multiples of "
            f"micro_batch_size x dp = {train.micro_batch_size} x {dp_size} = {unit}"
        )


# keys earlier versions wrote into every checkpoint's config.yaml and this one retired: the
# fault-injection switches (now test hooks, training/hooks.py)
RETIRED_KEYS = {
    "train": ("inject_nonfinite_steps", "inject_hang_step", "inject_hang_rank", "inject_hold_step")
}


def saved_run_config(path: str | Path) -> RunConfig:
    """The RunConfig a checkpoint saved (`<tag>/config.yaml`), read by this version (retired
    keys dropped)."""
    data = config_io.read_yaml(path)
    model = data.get("model")
    if isinstance(model, str) or (isinstance(model, dict) and "preset" in model):
        name = model if isinstance(model, str) else model["preset"]
        log.warning(
            "%s: saved before checkpoints held the resolved model: its preset %r is read from "
            "this version's preset table",
            path,
            name,
        )
    for section, keys in RETIRED_KEYS.items():
        if isinstance(data.get(section), dict):
            for key in keys:
                data[section].pop(key, None)
    return config_io.from_dict(RunConfig, data, where=str(path))
