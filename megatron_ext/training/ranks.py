"""Rank/world from the launcher, and `--nproc-per-node N` (spawn N local ranks ourselves).

Launchers: torchrun and the `deepspeed` launcher (RANK/WORLD_SIZE/MASTER_*), Slurm `srun`
(SLURM_PROCID, master = first host of the node list), `mpirun` / `srun --mpi=pmix`
(OMPI_COMM_WORLD_RANK / PMIX_RANK): megatron_ext.parallel.rank_env decides, and we export the
torchrun-style variables so torch.distributed's env:// rendezvous works under all of them.
The `deepspeed` launcher works on a CPU-only host too (`deepspeed --num_gpus N --module
megatron_ext train ...`: DeepSpeed picks its CPU accelerator, `--num_gpus` is the number of local
ranks); the `--local_rank=N` it passes before our command is dropped by megatron_ext.cli.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from megatron_ext.log import get_logger
from megatron_ext.parallel.rank_env import dist_env
from megatron_ext.training.stopping import INTERRUPT_AGAIN_S

log = get_logger(__name__)


def export_dist_env() -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from whatever launched us.

    A single process with no MASTER_PORT takes a free port rather than the default 29500, so
    several one-process runs on a machine (tests, notebooks) do not collide."""
    env = dist_env().torch_env()
    if env.get("WORLD_SIZE") == "1" and "MASTER_PORT" not in os.environ:
        env["MASTER_PORT"] = str(free_port())
    os.environ.update(env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(nproc: int, argv: list[str], timeout_s: float | None = None) -> int:
    """Run `python -m megatron_ext <argv>` as `nproc` local ranks; returns the worst exit code.

    SIGTERM/SIGUSR1 sent to this process are forwarded to every rank (so a Slurm warning or
    scancel makes them save and exit), and so is SIGINT (Ctrl-C: stop after the step and save;
    a second Ctrl-C kills the ranks). When one rank fails, the others are stopped.
    """
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ)
        for key in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
            env.pop(key, None)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        )
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_ext", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    interrupts: list[float] = []

    def interrupt(signum, frame):
        """Ctrl-C: the ranks stop at the step boundary and save (as on SIGTERM); a second one
        (after stopping.INTERRUPT_AGAIN_S) kills them at once."""
        now = time.monotonic()
        if interrupts and now - interrupts[0] > INTERRUPT_AGAIN_S:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise KeyboardInterrupt
        if not interrupts:
            log.warning("interrupted: the ranks stop after this step and save (Ctrl-C again: now)")
            forward(signum, frame)
        interrupts.append(now)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            now = time.monotonic()
            if (failed_at is not None and now - failed_at > 10) or (deadline and now > deadline):
                log.error("a rank failed or the run timed out; stopping the other ranks")
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:
            p.wait()
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0)
