"""Regression tests for the DeepSpeed traps handled in megatron_ext.training.engine/pipeline
(see ../shared/notes/deepspeed-cpu.md), on 2 gloo ranks with a 2-stage pipeline."""

from __future__ import annotations

import time

import pytest
import torch

from tests.distributed_utils import run_distributed_test


def _config(tmp: str):
    from megatron_ext.config import from_dict
    from megatron_ext.training.config import RunConfig

    return from_dict(
        RunConfig,
        {
            "model": {"preset": "tiny", "num_layers": 2},
            "parallel": {"tp": 1, "pp": 2},
            "data": {"path": "unused", "seq_length": 32},
            "train": {
                "iterations": 2,
                "micro_batch_size": 2,
                "global_batch_size": 4,
                "activation_checkpointing": "full",
            },
            "checkpoint": {"dir": tmp},
        },
    )


def _traps(rank, world_size, tmp):
    import deepspeed

    from megatron_ext.models.presets import resolve_model_config
    from megatron_ext.training import checkpointing
    from megatron_ext.training.engine import build_engine, init_distributed
    from megatron_ext.training.pipeline import TIED_KEY

    start = time.perf_counter()
    init_distributed(60.0)
    init_s = time.perf_counter() - start
    cfg = _config(tmp)
    model = resolve_model_config(cfg.model)
    model.seq_length = 32
    engine = build_engine(cfg, model)
    module = engine.module
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (2, 33), generator=g)
    batches = iter([(tokens[:, :-1], tokens[:, 1:])] * 4)
    losses = [float(engine.ds.train_batch(batches)) for _ in range(2)]
    checkpointing.save(engine, tmp, 2, {"iteration": 2}, cfg, keep=1)
    tied = module.tied_modules[TIED_KEY].word_embeddings.weight.detach().clone()
    saved = None
    if rank == 0:
        state = torch.load(f"{tmp}/iter_0000002/layer_00-model_00-model_states.pt")
        saved = state["word_embeddings.weight"]
    return {
        "shm_disabled": deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False,
        "init_s": init_s,
        "optimizer": type(engine.ds.optimizer.optimizer).__name__,
        "torch_adamw": isinstance(engine.ds.optimizer.optimizer, torch.optim.AdamW),
        "zero_stage": engine.ds.zero_optimization_stage(),
        "seed_layers": module.seed_layers,
        "ckpt_func": module.activation_checkpoint_func.__name__,
        "first_use_forward_fn": module._layer_specs[0].forward_fn,
        "losses": losses,
        "tied": tied,
        "saved": saved,
        # DeepSpeed's partitioning counts on meta builds: the same counts as initialised builds
        "counts": (
            module._count_layer_params(),
            [
                sum(p.numel() for p in spec.build().parameters()) if hasattr(spec, "build") else 0
                for spec in module._layer_specs
            ],
        ),
        # one set of tp/pp/dp groups: ours are DeepSpeed's pipeline grid's (and ZeRO's dp group)
        "shared_groups": (
            engine.ctx.tp_group is module._grid.slice_proc_group,
            engine.ctx.pp_group is module._grid.pp_proc_group,
            engine.ctx.dp_group is module._grid.dp_proc_group,
            engine.ctx.dp_group is engine.ds.grid.get_data_parallel_group(),
        ),
    }


@pytest.mark.distributed
def test_deepspeed_traps_are_handled(tmp_path):
    r0, r1 = run_distributed_test(_traps, 2, str(tmp_path), timeout_s=180)
    for r in (r0, r1):
        assert r["shm_disabled"] and r["init_s"] < 20  # no 36-73 s shm comm JIT
        # torch's (our SkippableAdamW: a loss spike can cancel its step), never FusedAdam (JIT
        # ~100 s)
        assert r["optimizer"] == "SkippableAdamW" and r["torch_adamw"]
        assert r["zero_stage"] == 1  # bf16 + ZeRO-0 cannot reload; ZeRO-2/3 refuse pipelines
        assert r["seed_layers"] is False  # seed_layers passes numpy ints to random.seed
        assert r["ckpt_func"] == "checkpoint_replaying_tracker"  # non-reentrant: embedding works
        assert r["first_use_forward_fn"] is None  # else the tied weight is never saved
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        assert r["shared_groups"] == (True, True, True, True)
        assert r["counts"][0] == r["counts"][1] and sum(r["counts"][0]) > 0
    assert r0["losses"] == r1["losses"]
    assert torch.equal(r0["tied"], r1["tied"])  # first and last stage stay tied
    assert torch.equal(r0["saved"], r0["tied"])  # the trained tied weight was saved


EXIT_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
from megatron_ext import cli
from megatron_ext.training import engine
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
cli.exit_after_shutdown(5)  # no process group yet: returns
atexit.register(lambda: print("finalization ran", flush=True))
dist.init_process_group("gloo")
if sys.argv[2] == "shutdown":
    engine.shutdown()
print("before exit", end="")  # unflushed: exit_after_shutdown flushes it
cli.exit_after_shutdown(7)
print("not reached")
"""


@pytest.mark.parametrize("ending", ["shutdown", "abandoned"])
def test_exit_after_shutdown_flushes_and_skips_finalization(ending):
    """After a clean shutdown, or with the group left alive after a failed collective (exit 4),
    the program leaves with os._exit: its code, its buffered output, and no interpreter
    finalization (where gloo aborted, turning exit 4 into 134)."""
    import subprocess
    import sys

    from megatron_ext.training.ranks import free_port

    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(free_port()), ending],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 7, proc.stderr[-2000:]
    assert proc.stdout.endswith("before exit")  # DeepSpeed may print its accelerator first
    assert "finalization ran" not in proc.stdout and "not reached" not in proc.stdout
