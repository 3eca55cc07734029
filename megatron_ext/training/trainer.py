"""The training loop: build, resume, then one `train_batch` per step until done or told to stop.

Each step: (stop check agreed by all ranks) -> train_batch over the global batch -> non-finite
check -> metrics -> validation every K steps -> checkpoint every N steps.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.parallel.distributed import is_communication_failure
from megatron_ext.training import (
    checkpointing,
    diagnostics,
    flops,
    preflight,
    spikes,
    universal,
)
from megatron_ext.training import hooks as step_hooks
from megatron_ext.training.config import RunConfig
from megatron_ext.training.data import (
    SkippedSamples,
    build_run_datasets,
    merge_skips,
    micro_batches,
    without_skipped,
)
from megatron_ext.training.engine import Engine, build_engine
from megatron_ext.training.hooks import StepContext
from megatron_ext.training.in_loop_eval import InLoopEval
from megatron_ext.training.metrics import (
    MetricsWriter,
    peak_memory_gb,
    peak_rss_mb,
    start_rss_tracking,
)
from megatron_ext.training.schedule import global_batch_size
from megatron_ext.training.stopping import StopConditions

log = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    nonfinite_in_a_row: int = 0


def _stop_reason(stop: StopConditions) -> str | None:
    """All ranks agree: one rank's signal stops everyone after the same step."""
    reason = stop.local_reason()
    # a CPU tensor: the process group's device map sends it through gloo next to NCCL/RCCL
    flag = torch.tensor([0 if reason is None else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    # once, at the stop: every rank learns why (the first rank that had a reason says)
    reasons: list = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    rank, first = next((r, why) for r, why in enumerate(reasons) if why is not None)
    return first if rank == dist.get_rank() else f"{first} (on rank {rank})"


class CollectiveError(RuntimeError):
    """A collective failed or timed out on this rank (a peer died or is stuck)."""


# What a DeepSpeed pipeline instruction communicates: the engine keeps the running one in
# `_exec_instr`, so a failed collective can be named without wrapping DeepSpeed.
_INSTRUCTION_COLLECTIVES = {
    "_exec_load_micro_batch": "loading a micro-batch",
    "_exec_forward_pass": "forward: tensor-parallel all-reduce/all-gather (the last stage: the "
    "loss's TP all-reduce)",
    "_exec_backward_pass": "backward: tensor-parallel all-reduce/reduce-scatter",
    "_exec_send_activations": "pipeline send of activations to the next stage",
    "_exec_recv_activations": "pipeline receive of activations from the previous stage",
    "_exec_send_grads": "pipeline send of gradients to the previous stage",
    "_exec_recv_grads": "pipeline receive of gradients from the next stage",
    "_exec_reduce_tied_grads": "all-reduce of the tied embedding's gradients (first/last stage)",
    "_exec_reduce_grads": "data-parallel gradient reduction (ZeRO-1)",
    "_exec_optimizer_step": "ZeRO-1 optimizer step (grad-norm all-reduce, parameter all-gather) "
    "or the loss broadcast after it",
}


def _collective_name(engine: Engine, phase: str) -> str:
    if phase != "train_batch":
        return phase
    instr = getattr(getattr(engine.ds, "_exec_instr", None), "__name__", None)
    if instr is None:
        return "train_batch"
    what = _INSTRUCTION_COLLECTIVES.get(instr, instr)
    return f"train_batch, pipeline instruction {instr.removeprefix('_exec_')} ({what})"


def _named(engine: Engine, step: int, phase: str, exc: Exception) -> CollectiveError:
    c = engine.ctx
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CollectiveError(
        f"step {step}: rank {c.rank} (pipeline stage {c.pp_rank}/{c.pp_size}, tp {c.tp_rank}, "
        f"dp {c.dp_rank}) failed in a collective during {_collective_name(engine, phase)}: "
        f"{detail}. A peer rank died or is stuck (its log stops earlier), or the step took "
        "longer than train.collective_timeout_s; the last complete checkpoint is kept."
    )


@contextmanager
def _collectives_named(engine: Engine, step: int, phase: str):
    """Re-raise a communication failure inside the block (a peer died or hangs) as
    CollectiveError naming this rank's stage and `phase`; any other error passes unchanged."""
    try:
        yield
    except RuntimeError as exc:
        if isinstance(exc, CollectiveError) or not is_communication_failure(exc):
            raise
        raise _named(engine, step, phase, exc) from exc


def _run_step(
    engine: Engine, batches, stop: StopConditions, step: int, hooks: list, run: StepContext
) -> tuple[str | None, float]:
    """(stop reason, None) or (None, loss of one optimizer step over the global batch), after
    the step hooks' before_step.

    A hung or broken collective (a rank died) raises CollectiveError naming this rank's stage
    and the collective; any other error (a shape bug, an out-of-memory) keeps its traceback."""
    phase = "the stop-check all-reduce (all ranks agree whether to stop)"
    with _collectives_named(engine, step, phase):
        step_hooks.before_step(hooks, run)
        reason = _stop_reason(stop)
    if reason is not None:
        return reason, float("nan")
    with _collectives_named(engine, step, "train_batch"):
        return None, float(engine.ds.train_batch(batches))


def evaluate_loss(
    engine: Engine, dataset, num_batches: int, micro_batch_size: int, gas: int | None = None
) -> float:
    """Mean loss over `num_batches` global batches of `dataset` from its start (`gas`
    micro-batches per rank each; default: the engine's current number)."""
    c = engine.ctx
    batches = micro_batches(dataset, 0, micro_batch_size, c.dp_rank, c.dp_size)
    gas = gas or engine.ds.gradient_accumulation_steps()
    losses = [
        float(engine.ds.eval_batch(batches, num_micro_batches=gas)) for _ in range(num_batches)
    ]
    return sum(losses) / len(losses)


def _start_plan(cfg: RunConfig) -> tuple[str | None, bool, list]:
    """What start-up learns from the checkpoint directories (run on rank 0, see `_train`):
    checkpoint.load's layout checked, the universal checkpoint of a layout change, whether
    every weight will come from a checkpoint, and the samples the run skips."""
    check_load_layout(cfg)
    universal_tag = _universal_tag(cfg)
    saved = checkpointing.saved_skips(cfg.checkpoint.dir)
    skips = (merge_skips(cfg.train.skip_samples, saved), saved)
    return universal_tag, _weights_from_checkpoint(cfg, universal_tag), skips


def check_new_skips(
    asked: list | None, saved: list | None, consumed_samples: int, root: str
) -> None:
    """Skip ranges the run config adds on a resume must lie ahead of it: a range before the
    resume point would shift every later sample instead (a rollback goes back first)."""
    first_unread = SkippedSamples(saved).index(consumed_samples)
    for a, b in asked or []:
        if a < first_unread and not any(sa <= a and b <= sb for sa, sb in saved or []):
            raise UserError(
                f"train.skip_samples [{a}, {b}]: the checkpoint this run resumes from has already "
                f"read the samples before {first_unread}; to skip these, go back first: "
                f"megatron-ext rollback --checkpoint {root} --to ITER --skip-samples {a}:{b}"
            )


def _universal_tag(cfg: RunConfig) -> str | None:
    """The universal checkpoint to load when checkpoint.dir was saved at another (tp, pp, dp)
    layout (converted offline first: else a UserError naming the command)."""
    layout = (cfg.parallel.tp, cfg.parallel.pp, cfg.data_parallel_size(dist.get_world_size()))
    tag = universal.needs_universal(cfg.checkpoint.dir, *layout)
    return None if tag is None else universal.require_converted(cfg.checkpoint.dir, tag, *layout)


def _weights_from_checkpoint(cfg: RunConfig, universal_tag: str | None) -> bool:
    """Whether `_resume` will load every weight (so none needs initialising): a layout-change
    resume, a resume from checkpoint.dir, or checkpoint.load; not when --start-over may begin
    from step 1 (a directory whose checkpoints all fail to load), and not on a fresh start."""
    if universal_tag:
        return True
    if checkpointing.candidates(Path(cfg.checkpoint.dir)):
        return not cfg.checkpoint.start_over
    return bool(cfg.checkpoint.load)


def check_load_layout(cfg: RunConfig) -> None:
    """checkpoint.load must have been saved at this run's tp (its per-layer files load at any
    pp and dp); otherwise name the conversion that makes it loadable."""
    load = cfg.checkpoint.load
    if not load or checkpointing.candidates(Path(cfg.checkpoint.dir)):
        return  # checkpoint.dir wins when it holds a checkpoint
    found = universal.saved_layout(load)
    if found is None or found[1]["tp"] == cfg.parallel.tp:
        return
    tag, saved = found
    raise UserError(
        f"checkpoint.load={load}: {tag} was saved at tp={saved['tp']}, this run has "
        f"tp={cfg.parallel.tp}. Reshard it first: megatron-ext convert reshard --checkpoint "
        f"{load} --output NEW --tp {cfg.parallel.tp} --pp {cfg.parallel.pp} (add "
        "--with-optimizer to keep the optimizer state), then set checkpoint.load=NEW"
    )


def _resume(
    engine: Engine, cfg: RunConfig, universal_tag: str | None, uninitialised: bool = False
) -> TrainState:
    """Resume from checkpoint.dir when it holds a checkpoint (also a restarted continued
    pretraining run); else start from checkpoint.load (weights only with reset_progress).
    uninitialised: the weights were allocated for a load, not initialised: nothing loading is
    then an error (never training from garbage)."""
    own = cfg.checkpoint.dir
    if universal_tag:
        found, reset = checkpointing.load(engine, own, universal_tag=universal_tag), False
    elif checkpointing.candidates(Path(own)) or not cfg.checkpoint.load:
        failures: list[str] = []
        found, reset = checkpointing.load(engine, own, failures=failures), False
        if found is None and failures:
            _start_over_or_refuse(cfg, failures)
    else:
        reset = cfg.checkpoint.reset_progress
        found = checkpointing.load(engine, cfg.checkpoint.load, weights_only=reset)
        if found is None:
            raise UserError(f"checkpoint.load={cfg.checkpoint.load}: no complete checkpoint there")
    if found is None:
        if uninitialised:
            raise UserError(f"checkpoint.dir={own}: no checkpoint loaded; nothing to resume from")
        return TrainState()
    if reset:
        log.info("reset progress: weights from %s, new iteration/optimizer/schedule", found[0])
        return TrainState()
    client = found[1]
    return TrainState(client.get("iteration", 0), client.get("consumed_samples", 0))


def _start_over_or_refuse(cfg: RunConfig, failures: list[str]) -> None:
    """checkpoint.dir holds checkpoints and none loads: an error (never a silent fresh start
    that overwrites and rotates them away), or with --start-over they are moved aside."""
    if not cfg.checkpoint.start_over:
        raise UserError(
            f"checkpoint.dir={cfg.checkpoint.dir} holds checkpoints but none of them loads:\n  "
            + "\n  ".join(failures)
            + "\nFix the cause (a changed model or layout, a damaged file) or, to train from "
            "scratch here anyway, run again with --start-over (the old checkpoints are moved to "
            "a set-aside-* directory, not deleted)"
        )
    checkpointing.set_aside(cfg.checkpoint.dir, failures)


def _client_state(state: TrainState, engine: Engine, cfg: RunConfig) -> dict:
    return {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": engine.ctx.dp_size},
        "universal_checkpoint_info": universal.universal_info(engine.model_config),
    }


def _save(engine: Engine, cfg: RunConfig, state: TrainState, keep: int | None = None) -> None:
    tag = checkpointing.tag_of(state.iteration)
    started = time.perf_counter()
    with _collectives_named(engine, state.iteration, f"the checkpoint save of {tag}"):
        checkpointing.save(
            engine,
            cfg.checkpoint.dir,
            state.iteration,
            _client_state(state, engine, cfg),
            cfg,
            cfg.checkpoint.keep if keep is None else keep,
        )
    if engine.ctx.rank == 0:
        log.info("training stalled %.3f s for the save of %s", time.perf_counter() - started, tag)


def _stop_on_spikes(engine: Engine, cfg: RunConfig, state: TrainState, spike_log) -> None:
    """Too many spikes close together (every rank judged the same ones): save and stop."""
    recent = spike_log.too_many(state.iteration)
    if recent is None:
        return
    _save(engine, cfg, state, keep=0)  # no rotation: the checkpoints before the spikes stay
    checkpointing.finish_saves(engine, cfg)
    root = cfg.checkpoint.dir
    tags = checkpointing.on_rank0(lambda: checkpointing.list_checkpoints(Path(root)))
    message = spike_log.stop_message(recent, root, tags)
    raise spikes.LossSpikeError(
        f"{message}. Saved {checkpointing.tag_of(state.iteration)} in {root}"
    )


def train(cfg: RunConfig, stop: StopConditions | None = None, hooks: list | None = None) -> dict:
    """Run (or resume) training; returns {"iteration", "stopped", "loss"}. Collective.
    stop: conditions installed by the caller at process start (default: installed here).
    hooks: step hooks (training/hooks.py; default: those named in MEGATRON_EXT_HOOKS)."""
    run_lock = checkpointing.lock_run_dir(cfg.checkpoint.dir)  # before anything writes there
    own = stop is None
    if own:
        stop = StopConditions(cfg.train.exit_duration_in_mins, cfg.train.kill_switch_file)
        stop.install()
    try:
        hooks = step_hooks.from_env(cfg) if hooks is None else hooks
        return _train(cfg, stop, diagnostics.builtin_hooks(cfg) + hooks)
    finally:
        if own:
            stop.uninstall()
        checkpointing.release_run_dir(run_lock)


def _train(cfg: RunConfig, stop: StopConditions, hooks: list) -> dict:
    model_config = cfg.model
    baseline_rss_mb = start_rss_tracking()  # what the model, optimizer and steps add comes after
    checkpointing.reset_async_state()
    asked_skips = cfg.train.skip_samples
    universal_tag, uninitialised, (cfg.train.skip_samples, saved_skips) = checkpointing.on_rank0(
        lambda: _start_plan(cfg)
    )  # skips a rollback recorded in the checkpoint it resumes from are kept
    if cfg.train.preflight:
        preflight.check(cfg.train.preflight_min_gbps)
    engine = build_engine(
        cfg,
        model_config,
        load_universal=universal_tag is not None,
        weights_from_checkpoint=uninitialised,
    )
    c = engine.ctx
    train_ds, valid_ds, _ = build_run_datasets(cfg)
    train_ds = without_skipped(train_ds, cfg.train.skip_samples)
    skipped = SkippedSamples(cfg.train.skip_samples)
    state = _resume(engine, cfg, universal_tag, uninitialised)
    check_new_skips(asked_skips, saved_skips, state.consumed_samples, cfg.checkpoint.dir)
    guard = spikes.install(cfg.train.spikes, engine)
    spike_log = spikes.SpikeLog(cfg.train.spikes)
    metrics = MetricsWriter(
        cfg.checkpoint.dir,
        c.rank == 0,
        cfg.logging.tensorboard,
        resume_step=state.iteration,
        wandb=cfg.logging.wandb,
    )
    batches = micro_batches(
        train_ds,
        state.consumed_samples,
        cfg.train.micro_batch_size,
        c.dp_rank,
        c.dp_size,
        cfg.data.num_workers,
        vocab_size=model_config.vocab_size,
    )
    seq, recompute = cfg.data.seq_length, cfg.train.activation_checkpointing
    flops_token = (
        flops.model_flops_per_token(model_config, seq),
        flops.hardware_flops_per_token(model_config, seq, recompute),
    )
    peak = flops.peak_tflops(c.device, cfg.logging.peak_tflops)
    run = StepContext(0, state.iteration, engine, cfg, lambda: _stop_reason(stop))
    result = {"iteration": state.iteration, "stopped": None, "loss": None}
    last_saved = state.iteration
    # the other ranks wait for rank 0's end-of-run eval wait in shutdown()'s barrier
    wait_cap = 0.8 * cfg.train.collective_timeout_s
    task_eval = InLoopEval(cfg.eval, cfg.checkpoint.dir, c.rank == 0, max_wait_s=wait_cap)
    try:
        while state.iteration < cfg.train.iterations:
            step = run.step = state.iteration + 1
            gbs = global_batch_size(state.consumed_samples, cfg.train)  # ramp-up, if any
            if gbs != engine.ds.train_batch_size():
                engine.ds.set_train_batch_size(gbs)  # more or fewer micro-batches per step
            tokens_per_step = gbs * cfg.data.seq_length
            lr = engine.lr()  # the scheduler moves on inside train_batch
            start = time.perf_counter()
            if guard is not None:
                guard.begin()
            reason, loss = _run_step(engine, batches, stop, step, hooks, run)
            if reason is not None:
                result["stopped"] = reason
                break
            elapsed = time.perf_counter() - start
            spike = guard.spiked() if guard is not None else None
            if spike is not None:  # the global sample indices of the batch
                samples = skipped.global_ranges(
                    state.consumed_samples, state.consumed_samples + gbs
                )
            state.iteration = step
            state.consumed_samples += gbs
            finite = math.isfinite(loss)
            state.nonfinite_in_a_row = 0 if finite else state.nonfinite_in_a_row + 1
            row = {
                "step": step,
                "loss": loss if finite else None,
                "skipped": not finite or bool(spike and guard.skips),
                "spike": spike is not None,
                "lr": lr,
                "grad_norm": engine.grad_norm() if finite else None,
                "loss_scale": engine.loss_scale(),
                "tokens_per_s": tokens_per_step / elapsed,
                **flops.throughput(flops_token, tokens_per_step, elapsed, c.world_size, peak),
                "peak_memory_gb": peak_memory_gb(),
                "peak_rss_mb": peak_rss_mb(),
                "baseline_rss_mb": baseline_rss_mb,
                "consumed_samples": state.consumed_samples,
                "global_batch_size": gbs,
            }
            if not finite:
                log.warning("step %d: non-finite loss, optimizer step skipped", step)
                if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                    # every rank sees the same loss: publish a save still being written
                    checkpointing.finish_saves(engine, cfg)
                    raise NonFiniteLossError(
                        f"{state.nonfinite_in_a_row} non-finite losses in a row (up to step {step});"
                        f" the last good checkpoint in {cfg.checkpoint.dir} is kept"
                    )
            if spike is not None:
                spike_log.record(step, samples, spike, guard.skips)
                row["spike_samples"] = samples
            ev = cfg.logging.eval_interval
            if ev and valid_ds is not None and step % ev == 0:
                full = cfg.grad_accumulation_steps(c.dp_size)  # full-size batches, ramp-up or not
                with _collectives_named(engine, step, "validation (eval_batch)"):
                    row["val_loss"] = evaluate_loss(
                        engine, valid_ds, cfg.logging.eval_iters, cfg.train.micro_batch_size, full
                    )
                row["val_ppl"] = math.exp(min(row["val_loss"], 50.0))
            step_hooks.after_step(hooks, run, row)
            if step % cfg.logging.interval == 0 or not finite or spike or "stragglers" in row:
                metrics.write(row)
            if spike is not None:
                _stop_on_spikes(engine, cfg, state, spike_log)
            result["loss"] = row["loss"]
            # no checkpoint inside a non-finite streak: the last good one stays the newest
            if step % cfg.checkpoint.interval == 0 and finite:
                _save(engine, cfg, state)
                last_saved = step
            for saved_step in checkpointing.take_completed():  # published (async: later)
                task_eval.after_save(saved_step)
        final_save = state.iteration != last_saved
        if final_save:
            _save(engine, cfg, state)
        started = time.perf_counter()
        with _collectives_named(engine, state.iteration, "waiting for the last checkpoint"):
            checkpointing.finish_saves(engine, cfg)  # async: the last save is published
        if cfg.checkpoint.async_save and c.rank == 0:
            log.info("waited %.3f s for the last background write", time.perf_counter() - started)
        for saved_step in checkpointing.take_completed():
            task_eval.after_save(saved_step)
        task_eval.finish()
        if result["stopped"]:
            if final_save:
                saved = "checkpoint saved"
            elif state.iteration:
                saved = f"{checkpointing.tag_of(state.iteration)} is already the newest checkpoint"
            else:
                saved = "no step was run, nothing to save"
            log.info("stopping at step %d: %s (%s)", state.iteration, result["stopped"], saved)
    finally:
        metrics.close()
        checkpointing.wait_for_rotation()
    result["iteration"] = state.iteration
    return result
