"""The one DeepSpeed adapter: process groups, the pipeline module, optimizer, engine config.

Every DeepSpeed trap measured in ../shared/notes/deepspeed-cpu.md is handled here, each with a
regression test in tests/training/test_engine.py:
- the shared-memory comm op JIT-compiles for 36-73 s at the first init: disabled before init;
- optimizer "Adam" picks FusedAdam (JIT, ~100 s): we pass our own torch.optim.AdamW;
- bf16 with ZeRO-0 in the pipeline engine cannot reload its checkpoint: always ZeRO stage 1
  (also with fp32 gradient accumulation, the bf16 default, which runs DeepSpeed's BF16_Optimizer);
- ZeRO-2/3 are refused with the pipeline engine: stage 1 only;
- the pipeline's activation partitioning over TP breaks sequence parallelism: off with SP
  (regression test: test_layouts.py, sequence parallelism at pp=2 tp=2);
- a TiedLayerSpec whose first use has a forward_fn is never saved (see pipeline.layer_specs);
- `seed_layers=True` passes a numpy int to `random.seed`: we never use it (stage_init_rng);
- pipeline activation checkpointing with the reentrant function fails on the embedding:
  non-reentrant torch.utils.checkpoint, only on PipeBlock layers;
- ~1 in 6-10 gloo runs abort at exit: `shutdown()` ends with barrier + destroy_process_group;
  even then ~1 in 100+ rank processes still aborted in interpreter finalization ("terminate
  called without an active exception": a gloo worker thread's work object destroyed while the
  interpreter is torn down), so a program that made a process group (shut down, or left
  alive after a timed-out collective) leaves with os._exit after flushing (`cli.main`,
  `exit_after_shutdown`);
- subgroups ignore init_process_group's timeout (30 min on gloo): `apply_collective_timeout`
  (regression test: test_resume.py::test_stuck_rank_times_out_naming_stage_and_collective).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_ext import checkpoint_format, precision
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel import distributed
from megatron_ext.parallel.context import ParallelContext
from megatron_ext.parallel.drift import register_tp_duplicated_grad_hooks
from megatron_ext.parallel.tensor_parallel.random import recompute_with_tracker
from megatron_ext.training.config import RunConfig
from megatron_ext.training.pipeline import LMLoss, layer_specs, partition_method
from megatron_ext.training.schedule import learning_rate
from megatron_ext.training.spikes import SkippableAdamW

log = get_logger(__name__)

DTYPES = precision.DTYPES


def init_distributed(timeout_s: float, accelerator: str | None = "auto") -> torch.device:
    """Bind this rank's GPU, create the default process group with a device map (gloo for
    CPU tensors, NCCL/RCCL for GPU tensors; see megatron_ext.parallel.distributed) and a
    collective timeout, then DeepSpeed's comm layer on top of it; returns this rank's device.
    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* (see megatron_ext.training.ranks)."""
    import deepspeed

    # Trap: the first init JIT-compiles a shared-memory comm op (36-73 s on 2 cores).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if dist.is_initialized():
        device = distributed.current_device()
    else:
        device = distributed.init_process_group(timeout_s, accelerator=accelerator)
    if device.type == "cuda":
        # fp32 matmuls (a run or a reference kept in fp32) use TF32 tensor cores, as the
        # other stacks do; bf16/fp16 matmuls are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deepspeed.init_distributed(
        dist_backend=distributed.accelerator_backend() or "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return device


def apply_collective_timeout(timeout_s: float) -> int:
    """Give every process group of this rank the collective timeout; returns how many.

    Trap: `init_process_group(timeout=...)` covers the world group only; groups made later
    with `dist.new_group(ranks)` (our tp/pp/dp groups, DeepSpeed's grid and ZeRO groups) get
    torch's default (30 min for gloo), so a stuck peer would hang a TP all-reduce or a pipeline
    send/recv for half an hour. Call after the engine has created its groups."""
    return distributed.set_group_timeouts(timeout_s)


_SHUT_DOWN = False


def shutdown() -> None:
    """Trap: gloo runs sometimes abort at exit without a final barrier + destroy."""
    global _SHUT_DOWN
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _SHUT_DOWN = True


def was_shut_down() -> bool:
    """True once this process's group was torn down cleanly by `shutdown`."""
    return _SHUT_DOWN


def group_was_used() -> bool:
    """True when this process made a process group: shut down, or still alive because a
    collective failed (a stuck or dead peer) and no barrier could end it."""
    return _SHUT_DOWN or (dist.is_available() and dist.is_initialized())


def deepspeed_config(cfg: RunConfig, dp_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config of a run (ZeRO-1 always; see the module docstring)."""
    train = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(dp_size),
        "train_batch_size": train.global_batch_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
        # Trap: by default the pipeline sends 1/tp of each activation per TP rank and
        # all-gathers it on the next stage (`pipe_partitioned`, `grad_partitioned`), assuming
        # every TP rank holds the same tensor. Under sequence parallelism each holds its own
        # sequence shard [s/tp, b, h]: the gathered tensor mixes the ranks' shards (losses off
        # by 1e-2 at pp=2 tp=2). The shards are already 1/tp of the activation: send them whole.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # fp32 accumulation across micro-batches: with ZeRO stage 1 DeepSpeed then runs its
        # BF16_Optimizer (fp32 gradient buffers). Its reload trap (KeyError: 0) is a ZeRO-0
        # one: at stage 1 the optimizer saves per-rank bf16_zero_pp_rank_* files and reloads
        # exactly (tests/training/test_precision.py at pp=2 and tp=2).
        ds["data_types"] = {"grad_accum_dtype": train.grad_accum_dtype}
    elif train.precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": int(torch.tensor(cfg.optim.initial_loss_scale).log2()),
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return ds


def build_optimizer(
    module: torch.nn.Module, cfg: RunConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """torch AdamW (never DeepSpeed's JIT-built FusedAdam), torch's fused kernel on CUDA/ROCm
    (`device`), whose step a loss spike can cancel (training/spikes.py); no weight decay on
    biases and norms (ndim < 2)."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    o = cfg.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device is not None and device.type == "cuda"
    return SkippableAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


def _lr_factor(step: int, cfg: RunConfig) -> float:
    return learning_rate(step, cfg.optim, cfg.train.iterations) / cfg.optim.lr


def _mark_tensor_parallel(module: torch.nn.Module) -> None:
    """DeepSpeed's grad norm counts a parameter on every TP rank only when it is marked
    `tensor_model_parallel`; the rest (duplicated) once, on TP rank 0."""
    for p in module.parameters():
        if getattr(p, "tensor_parallel", False):
            p.tensor_model_parallel = True


@dataclass
class Engine:
    """The DeepSpeed pipeline engine of this rank plus our context and loss function."""

    ds: object  # deepspeed.runtime.pipe.engine.PipelineEngine
    ctx: ParallelContext
    model_config: ModelConfig
    loss_fn: LMLoss
    parts: list[int]

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def loss_scale(self) -> float | None:
        opt = getattr(self.ds, "optimizer", None)
        scale = getattr(opt, "loss_scale", None) if opt is not None else None
        return None if scale is None else float(scale)

    def lr(self) -> float:
        return float(self.ds.optimizer.param_groups[0]["lr"])


def grid_groups(grid) -> dict[str, dist.ProcessGroup]:
    """This rank's tp/pp/dp groups of DeepSpeed's pipeline grid, for our ParallelContext (the
    grid's "slice" group is the TP group; ParallelContext.from_sizes checks their ranks)."""
    return {"tp": grid.slice_proc_group, "pp": grid.pp_proc_group, "dp": grid.dp_proc_group}


@contextlib.contextmanager
def reusing_grid(grid):
    """PipelineModule builds its own PipelineParallelGrid (a second set of tp/pp/dp process
    groups beside ours: twice the communicators and their buffers at scale); while building it,
    hand it the grid our ParallelContext already uses."""
    from deepspeed.runtime.pipe import module as pipe_module

    made = pipe_module.PipelineParallelGrid

    def same_grid(process_group=None, topology=None):
        if topology is not grid._topo:
            raise RuntimeError("PipelineModule asked for a grid of another topology")
        return grid

    pipe_module.PipelineParallelGrid = same_grid
    try:
        yield
    finally:
        pipe_module.PipelineParallelGrid = made


def pipeline_module_class():
    """DeepSpeed's PipelineModule with two start-up costs removed (issue 17.6):
    - partition_method="parameters" counts each layer's parameters by building every layer of
      the whole model, initialised, on every rank (at 176B: all 70 blocks' full fp32 init per
      rank before training starts): counted on meta builds instead;
    - a stage built on the meta device (weights a checkpoint load overwrites) is allocated,
      uninitialised, where DeepSpeed moves the module to its device."""
    from deepspeed.pipe import LayerSpec, PipelineModule

    class StagePipeline(PipelineModule):
        def _count_layer_params(self):
            counts = [0] * len(self._layer_specs)
            for idx, layer in enumerate(self._layer_specs):
                if isinstance(layer, LayerSpec):
                    kwargs = {**layer.module_kwargs, "device": "meta"}
                    layer = layer.typename(*layer.module_args, **kwargs)
                if isinstance(layer, torch.nn.Module):
                    counts[idx] = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            return counts

        def to(self, *args, **kwargs):
            if _KEEP_META:
                return self
            if not any(p.is_meta for p in self.parameters()):
                return super().to(*args, **kwargs)
            # trap: to_empty replaces meta parameters by new Parameter objects, dropping their
            # attributes (tensor_parallel, partition_dim, tp_duplicated: without them the bf16
            # optimizer's grad norm skips the TP shards); copied over
            tags = {n: dict(vars(p)) for n, p in self.named_parameters(remove_duplicate=False)}
            self.to_empty(device=kwargs.get("device", args[0] if args else None))
            for name, param in self.named_parameters(remove_duplicate=False):
                vars(param).update(tags[name])
            return self

    return StagePipeline


_KEEP_META = False


@contextlib.contextmanager
def keeping_meta():
    """While building a stage on the meta device (device="meta"), leave it there: DeepSpeed's
    PipelineModule moves the stage to its device in __init__ (`megatron-ext rehearse` builds
    176B stages of every rank that way without allocating them)."""
    global _KEEP_META
    _KEEP_META = True
    try:
        yield
    finally:
        _KEEP_META = False


def build_grid(cfg: RunConfig):
    """DeepSpeed's pipeline grid (its tp/pp/dp groups, made once) and our ParallelContext over
    the same groups (collective); returns (topology, grid, ctx)."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = cfg.data_parallel_size(dist.get_world_size())
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    grid = PipelineParallelGrid(topology=topology)
    ctx = ParallelContext.from_sizes(
        tp, pp, dp, sequence_parallel=cfg.parallel.sequence_parallel, existing=grid_groups(grid)
    )
    return topology, grid, ctx


def build_stage(cfg: RunConfig, model_config: ModelConfig, device: str | None = None):
    """DeepSpeed's grid (its tp/pp/dp groups, shared with our ParallelContext) and this rank's
    pipeline stage (collective); returns (topology, grid, ctx, module, loss_fn, dtype).
    device="meta": built without allocation (allocated uninitialised when DeepSpeed moves it,
    unless `keeping_meta`)."""
    model_config.check_tp(cfg.parallel.tp)
    topology, grid, ctx = build_grid(cfg)
    # dropout: the default generator alike on TP ranks, the TP tracker different per TP rank
    # (attention heads, SP shards); a checkpoint saves both (training/checkpointing.py)
    ctx.seed(cfg.train.seed)
    loss_fn = LMLoss(ctx, model_config.vocab_size)
    ckpt = cfg.train.activation_checkpointing
    every = cfg.train.checkpoint_every_layers
    interval = {"none": 0, "selective": 0, "full": 1, "every": every}[ckpt]
    with reusing_grid(grid):
        module = pipeline_module_class()(
            layers=layer_specs(model_config, ctx, cfg.train.seed, device=device),
            topology=topology,
            loss_fn=loss_fn,
            partition_method=partition_method(cfg.parallel.partition_method),
            activation_checkpoint_interval=interval,
            activation_checkpoint_func=recompute_with_tracker(ctx.rng),
            checkpointable_layers=["PipeBlock"],
        )
    if ckpt == "selective":
        from megatron_ext.models.attention import SelfAttention

        for layer in module.modules():
            if isinstance(layer, SelfAttention):
                layer.recompute_core = True
    dtype = DTYPES[cfg.train.precision]
    if dtype != torch.float32 and not _KEEP_META:
        module.to(dtype)  # DeepSpeed keeps fp32 master weights in its ZeRO-1 optimizer
    _mark_tensor_parallel(module)
    register_tp_duplicated_grad_hooks(module, ctx)
    return topology, grid, ctx, module, loss_fn, dtype


def build_engine(
    cfg: RunConfig,
    model_config: ModelConfig,
    load_universal: bool = False,
    weights_from_checkpoint: bool = False,
) -> Engine:
    """Build this rank's pipeline stage and the DeepSpeed engine (collective: all ranks).

    weights_from_checkpoint: the caller loads every weight (and the optimizer's fp32 copies, or
    DeepSpeed refreshes them from the weights) right after: the stage is built on the meta
    device and allocated uninitialised, with no init cost."""
    import deepspeed

    if cfg.train.precision == "fp16" and not deepspeed.get_accelerator().is_fp16_supported():
        raise UserError(
            "train.precision=fp16: DeepSpeed's accelerator on this machine "
            f"({deepspeed.get_accelerator().device_name()}) has no fp16; use bf16 (or fp32) here"
        )
    device = "meta" if weights_from_checkpoint else None
    topology, grid, ctx, module, loss_fn, dtype = build_stage(cfg, model_config, device)
    dp = ctx.dp_size
    device = distributed.current_device()
    if device.type == "cuda" and dtype == torch.float32:
        log.warning(
            "training in fp32 on a GPU (train.precision=fp32): about 2-8x slower than bf16 and "
            "twice the activation memory; set train.precision=bf16 unless this is a reference run"
        )
    optimizer = build_optimizer(module, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_lr_factor, cfg=cfg))
    ds, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp, load_universal),
    )
    # checksums written with every file, checked before every load, weights-only unpickling
    ds.checkpoint_engine = checkpoint_format.checkpoint_engine()
    apply_collective_timeout(cfg.train.collective_timeout_s)
    return Engine(ds, ctx, model_config, loss_fn, list(module.parts))
