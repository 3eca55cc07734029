"""Seeing why a run is slow: the straggler report and the profiler, as step hooks.

StragglerReport (logging.straggler_interval: every N steps, 0 off): on those steps each rank
times DeepSpeed's pipeline instructions by kind (forward, backward, communication, optimizer,
data), synchronising the GPU around each; every rank's times are gathered and rank 0 reports the
ranks slowest against the median of their pipeline stage (the ranks of a stage do the same work;
all ranks' median where a stage has one rank; communication is mostly waiting for a slow peer,
so compute = forward + backward + optimizer is compared; tensor-parallel collectives inside the
forward and backward count as compute, so a slow GPU also slows its TP peers' figures). Other steps pay one flag test per instruction.

Profiler (logging.profile_steps: [first, last]): torch.profiler records those steps on the ranks
of logging.profile_ranks into <checkpoint.dir>/profile/ (TensorBoard's profiler plugin reads
it), and on GPUs a CUDA memory snapshot (memory_rankN.pickle, for pytorch.org/memory_viz).
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext.log import get_logger
from megatron_ext.parallel import distributed

log = get_logger(__name__)

KINDS = ("forward", "backward", "communication", "optimizer", "data")
_KIND_OF = {
    "_exec_forward_pass": "forward",
    "_exec_backward_pass": "backward",
    "_exec_optimizer_step": "optimizer",
    "_exec_load_micro_batch": "data",
}
REPORTED = 3  # the slowest ranks named per report


def builtin_hooks(cfg) -> list:
    """The diagnostics a run config asks for (none by default costs nothing)."""
    hooks: list = []
    if cfg.logging.straggler_interval:
        hooks.append(StragglerReport(cfg.logging.straggler_interval))
    if cfg.logging.profile_steps:
        hooks.append(Profiler(cfg.logging.profile_steps, cfg.logging.profile_ranks, cfg))
    return hooks


class StragglerReport:
    def __init__(self, interval: int):
        self.interval = interval
        self.active = False
        self.times = dict.fromkeys(KINDS, 0.0)
        self.installed = False

    def _install(self, ds) -> None:
        """Time the engine's instructions (its own copy of the class's instruction map)."""
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def timed(fn):
            kind = _KIND_OF.get(fn.__name__, "communication")

            @functools.wraps(fn)
            def run(engine, *args, **kwargs):
                if not self.active:
                    return fn(engine, *args, **kwargs)
                sync()
                start = time.perf_counter()
                out = fn(engine, *args, **kwargs)
                sync()
                self.times[kind] += time.perf_counter() - start
                self.active = kind != "optimizer"  # the step ends there (not validation's)
                return out

            return run

        ds._INSTRUCTION_MAP = {k: timed(fn) for k, fn in type(ds)._INSTRUCTION_MAP.items()}
        self.installed = True

    def before_step(self, run) -> None:
        if not self.installed:
            self._install(run.engine.ds)
        self.active = run.step % self.interval == 0
        self.times = dict.fromkeys(KINDS, 0.0)

    def after_step(self, run, row: dict) -> None:
        if run.step % self.interval:
            return
        self.active = False
        ranks = _gather_times(self.times, run.engine.ctx.pp_rank)
        row["stragglers"] = slowest(ranks)
        if dist.get_rank() == 0:
            log.info("straggler report, step %d: %s", run.step, report_text(row["stragglers"]))


def _gather_times(times: dict, stage: int) -> list[dict]:
    """Every rank's times (ms) with its host and stage."""
    values = [stage, *(times[k] * 1e3 for k in KINDS)]
    return [
        {
            "rank": rank,
            "host": host,
            "stage": int(got[0]),
            **{f"{k}_ms": v for k, v in zip(KINDS, got[1:], strict=True)},
        }
        for rank, (host, got) in enumerate(distributed.gather_from_hosts(values))
    ]


def slowest(ranks: list[dict], count: int = REPORTED) -> list[dict]:
    """The COUNT ranks whose compute time most exceeds the median of the ranks doing the same
    work (their pipeline stage's; all ranks' where a stage has one rank), slowest first."""
    for r in ranks:
        r["compute_ms"] = r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"]
    everyone = statistics.median(r["compute_ms"] for r in ranks)
    peers: dict[int, list[float]] = {}
    for r in ranks:
        peers.setdefault(r["stage"], []).append(r["compute_ms"])
    rows = []
    for r in ranks:
        same = peers[r["stage"]]
        median = statistics.median(same) if len(same) > 1 else everyone
        rows.append(
            {
                "rank": r["rank"],
                "host": r["host"],
                "stage": r["stage"],
                "compute_ms": round(r["compute_ms"], 3),
                "median_ms": round(median, 3),
                "median_of": "its stage" if len(same) > 1 else "all ranks",
                "slower_pct": round(100 * (r["compute_ms"] / max(median, 1e-9) - 1), 1),
                "communication_ms": round(r["communication_ms"], 3),
            }
        )
    rows.sort(key=lambda r: -r["slower_pct"])
    return rows[:count]


def report_text(rows: list[dict]) -> str:
    return "; ".join(
        f"rank {r['rank']} on {r['host']} (stage {r['stage']}): compute {r['compute_ms']:.1f} ms "
        f"vs the median {r['median_ms']:.1f} ms of {r['median_of']} ({r['slower_pct']:+.1f}%), "
        f"communication {r['communication_ms']:.1f} ms"
        for r in rows
    )


class Profiler:
    def __init__(self, steps: list[int], ranks: list[int] | None, cfg):
        self.first, self.last = steps
        self.ranks = ranks
        self.out = Path(cfg.checkpoint.dir) / "profile"
        self.prof = self.marker = None

    def _mine(self) -> bool:
        return self.ranks is None or dist.get_rank() in self.ranks

    def before_step(self, run) -> None:
        if not self._mine() or not self.first <= run.step <= self.last:
            return
        if self.prof is None:
            self._start()
        self.marker = torch.autograd.profiler.record_function(f"train step {run.step}")
        self.marker.__enter__()

    def after_step(self, run, row: dict) -> None:
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if self.prof is not None and run.step >= self.last:
            self._stop()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        self.out.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof = profile(
            activities=activities,
            on_trace_ready=tensorboard_trace_handler(
                str(self.out), worker_name=f"rank{dist.get_rank()}"
            ),
            profile_memory=True,
        )
        self.prof.start()
        log.info("profiling steps %d-%d into %s", self.first, self.last, self.out)

    def _stop(self) -> None:
        self.prof.stop()  # writes the trace
        self.prof = None
        if torch.cuda.is_available():
            torch.cuda.memory._dump_snapshot(str(self.out / f"memory_rank{dist.get_rank()}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        log.info("profile written to %s", self.out)
