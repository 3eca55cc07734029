"""Step hooks: code that runs before and after each training step (a profiler, extra metrics, the
tests' fault injection) without a switch in the run config or a branch in the loop.

A hook is any object with either or both of
    before_step(run: StepContext) -> None     before the stop check and train_batch of run.step
    after_step(run: StepContext, row: dict)   after the step's metrics row is complete
Hooks come from `train(cfg, stop, hooks=[...])`, or, for a run started from the command line,
from the environment: MEGATRON_EXT_HOOKS="package.module:factory[,...]", each factory called
with the RunConfig and returning a hook (or None). Every rank runs its hooks; a hook that runs a
collective must do so on every rank (`run.agree_to_stop` is one).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_ext.errors import UserError

ENV = "MEGATRON_EXT_HOOKS"


@dataclass
class StepContext:
    step: int  # the step about to run (before_step) or just run (after_step)
    start_iteration: int  # the iteration this run resumed from (0 for a fresh run)
    engine: Any  # training.engine.Engine
    cfg: Any  # training.config.RunConfig
    agree_to_stop: Callable[[], str | None]  # collective: the stop reason all ranks agree on


def from_env(cfg) -> list:
    """The hooks named in MEGATRON_EXT_HOOKS (none when unset)."""
    hooks = []
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV, "").split(","))):
        module_name, sep, attr = spec.partition(":")
        if not sep:
            raise UserError(f"{ENV}={spec!r}: expected module:factory")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"{ENV}: cannot load {spec!r} ({exc})") from None
        hook = factory(cfg)
        if hook is not None:
            hooks.append(hook)
    return hooks


def before_step(hooks: list, run: StepContext) -> None:
    for hook in hooks:
        if hasattr(hook, "before_step"):
            hook.before_step(run)


def after_step(hooks: list, run: StepContext, row: dict) -> None:
    for hook in hooks:
        if hasattr(hook, "after_step"):
            hook.after_step(run, row)
