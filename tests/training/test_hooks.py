"""Step hooks replace the fault-injection switches of the run config: the switches are gone
from RunConfig (a config that sets one is refused), checkpoints saved with them still load, and
hooks are loaded from MEGATRON_EXT_HOOKS with a clear error when the name is wrong."""

from __future__ import annotations

import pytest
import yaml

from megatron_ext.config import from_dict
from megatron_ext.errors import UserError
from megatron_ext.training import hooks
from megatron_ext.training.config import RunConfig, saved_run_config


def test_the_injection_switches_are_not_config():
    with pytest.raises(UserError, match="unknown key"):
        from_dict(RunConfig, {"train": {"inject_hang_step": 3}})


def test_a_checkpoint_config_saved_with_them_still_loads(tmp_path):
    path = tmp_path / "config.yaml"
    data = {"train": {"iterations": 7, "inject_nonfinite_steps": None, "inject_hang_rank": 0}}
    path.write_text(yaml.safe_dump(data))
    assert saved_run_config(path).train.iterations == 7


class _Recorder:
    def __init__(self, cfg):
        self.cfg, self.seen = cfg, []

    def before_step(self, run):
        self.seen.append(("before", run.step))

    def after_step(self, run, row):
        self.seen.append(("after", run.step, row["loss"]))


def test_hooks_from_the_environment(monkeypatch):
    monkeypatch.setenv(hooks.ENV, f"{__name__}:_Recorder, {__name__}:_none")
    cfg = RunConfig()
    (hook,) = hooks.from_env(cfg)
    assert isinstance(hook, _Recorder) and hook.cfg is cfg
    run = hooks.StepContext(3, 0, None, cfg, lambda: None)
    hooks.before_step([hook, object()], run)  # a hook may have either method
    hooks.after_step([hook], run, {"loss": 1.5})
    assert hook.seen == [("before", 3), ("after", 3, 1.5)]
    for bad, why in [
        ("nocolon", "expected module:factory"),
        (f"{__name__}:missing", "cannot load"),
    ]:
        monkeypatch.setenv(hooks.ENV, bad)
        with pytest.raises(UserError, match=why):
            hooks.from_env(cfg)


def _none(cfg):
    return None
