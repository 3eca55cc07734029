"""Fault injection for the tests, as a step hook (megatron_ext/training/hooks.py): a run started
with `env(faults={...})` (tests/training/helpers.py) loads it through MEGATRON_EXT_HOOKS.

faults (JSON in MEGATRON_EXT_FAULTS):
    nonfinite_steps: [3, 4]   the loss of these steps is multiplied by NaN
    hang_step, hang_rank      that rank sleeps forever in its first forward of that step, so its
                              peers wait in a collective until train.collective_timeout_s
    hold_step: N              a run that starts before step N stops there, all ranks polling the
                              agreed stop check every 0.2 s until a stop condition fires (a test
                              can then have Slurm's own time-limit signal interrupt it, however
                              fast the machine is)
    slow_save_step, slow_save_rank, slow_save_s
                              that rank sleeps slow_save_s before writing the checkpoint of that
                              step (a filesystem slower than the collective timeout); with
                              checkpoint.async_save the background writer sleeps
    fail_save_step, fail_save_rank
                              that rank's writes of that step's checkpoint fail (disk full)
    spike_steps: [7, 9]       the loss of these steps is multiplied by 1000 (a loss spike)
    drop_samples: [[a, b]]    the training data never holds global samples [a, b) (a torch
                              Subset made here: the reference for train.skip_samples)
"""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist

from megatron_ext.log import get_logger

log = get_logger(__name__)

ENV = "MEGATRON_EXT_FAULTS"


def env_vars(faults: dict) -> dict:
    return {"MEGATRON_EXT_HOOKS": "tests.training.faults:from_env", ENV: json.dumps(faults)}


def from_env(cfg) -> Faults | None:
    raw = os.environ.get(ENV)
    return Faults(**json.loads(raw)) if raw else None


class Faults:
    def __init__(
        self,
        nonfinite_steps=(),
        hang_step=None,
        hang_rank=0,
        hold_step=None,
        slow_save_step=None,
        slow_save_rank=0,
        slow_save_s=0.0,
        fail_save_step=None,
        fail_save_rank=0,
        spike_steps=(),
        drop_samples=(),
    ):
        self.nonfinite_steps = set(nonfinite_steps)
        self.spike_steps = set(spike_steps)
        self.factor = 1.0
        if drop_samples:
            _drop_from_training_data(drop_samples)
        self.slow_save = (slow_save_step, slow_save_rank, slow_save_s)
        self.fail_save = (fail_save_step, fail_save_rank)
        self.hang_step, self.hang_rank, self.hold_step = hang_step, hang_rank, hold_step
        self.installed = False

    def _install(self, engine) -> None:
        module = engine.ds.module  # DeepSpeed's PipelineModule: calls module.loss_fn
        loss_fn = module.loss_fn
        module.loss_fn = lambda out, labels: loss_fn(out, labels) * self.factor
        if self.hang_step is not None and dist.get_rank() == self.hang_rank:
            module.register_forward_pre_hook(self._maybe_hang)
        step, rank, seconds = self.slow_save
        if step is not None and dist.get_rank() == rank:
            files = engine.ds.checkpoint_engine
            write = files.write  # the file write: a background thread's with async_save

            def slow(state_dict, path):
                if f"iter_{step:07d}" in str(path) and not self.slept:  # that step's files
                    log.warning("fault injection: rank %d saves %.0f s late", rank, seconds)
                    self.slept = True
                    time.sleep(seconds)
                return write(state_dict, path)

            files.write = slow
        fail_step, fail_rank = self.fail_save  # own names: `slow` above closes over `step`
        if fail_step is not None and dist.get_rank() == fail_rank:
            files = engine.ds.checkpoint_engine
            write_on = files.write

            def failing(state_dict, path):
                if f"iter_{fail_step:07d}" in str(path):
                    raise OSError(28, "No space left on device (fault injection)")
                return write_on(state_dict, path)

            files.write = failing
        self.slept = False
        self.installed = True

    def _maybe_hang(self, module, args) -> None:
        if self.step == self.hang_step:
            log.warning("fault injection: rank %d hangs here", dist.get_rank())
            while True:
                time.sleep(3600)

    def before_step(self, run) -> None:
        if not self.installed:
            self._install(run.engine)
        self.step = run.step
        self.factor = float("nan") if run.step in self.nonfinite_steps else 1.0
        self.factor *= 1000.0 if run.step in self.spike_steps else 1.0
        hold = self.hold_step
        if hold is not None and run.start_iteration < hold and run.step == hold + 1:
            log.warning("fault injection: holding before step %d until a stop condition", run.step)
            while run.agree_to_stop() is None:
                time.sleep(0.2)


def _drop_from_training_data(ranges) -> None:
    """The trainer's training split without the global samples of RANGES."""
    from torch.utils.data import Subset

    from megatron_ext.training import trainer
    from megatron_ext.training.data import sample_counts

    build = trainer.build_run_datasets

    def without(cfg, counts=None):
        train, valid, test = counts or sample_counts(cfg)
        train, valid, test = build(cfg, (train + sum(b - a for a, b in ranges), valid, test))
        kept = [i for i in range(len(train)) if not any(a <= i < b for a, b in ranges)]
        return Subset(train, kept), valid, test

    trainer.build_run_datasets = without
