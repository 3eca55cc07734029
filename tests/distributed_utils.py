"""Run a test function on several CPU processes over gloo, as one rank each.

    results = run_distributed_test(fn, world_size, *args)

`fn(rank, world_size, *args)` must be a module-level function (processes are spawned, so it
is imported by name). Each rank runs with torch.distributed initialised through the trainer's
own `megatron_ext.parallel.distributed.init_process_group` (a free port, one CPU thread), with
the device map "cpu:gloo,cuda:cuda_only_gloo": a backend registered for CUDA tensors only stands
in for NCCL, so a CPU tensor sent to a group without a CPU backend fails here as on a GPU; its return value comes back in `results[rank]` (anything torch.save can
pickle). A failing rank fails the test with that rank's traceback; the other ranks are
stopped instead of hanging in a collective. Every rank ends with barrier + destroy.
Mark such tests `@pytest.mark.distributed`.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_ext.parallel.distributed import init_process_group
from megatron_ext.training.ranks import free_port

CUDA_ONLY_BACKEND = "cuda_only_gloo"


def _cuda_only_gloo(store, rank, world_size, timeout):
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def register_cuda_only_backend() -> None:
    """A stand-in for NCCL: gloo registered for the "cuda" device type only (a CPU tensor on a
    group that has only this backend raises "No backend type associated with device type
    cpu", NCCL's failure mode)."""
    if not hasattr(dist.Backend, CUDA_ONLY_BACKEND.upper()):
        dist.Backend.register_backend(CUDA_ONLY_BACKEND, _cuda_only_gloo, devices=["cuda"])


def _worker(rank, world_size, port, out_dir, timeout_s, accelerator, fn, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # the CI machines have 2 cores for all ranks
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        register_cuda_only_backend()
        init_process_group(timeout_s, rank=rank, world_size=world_size, accelerator=accelerator)
        result = fn(rank, world_size, *args)
        torch.save(("ok", result), out)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        torch.save(("error", traceback.format_exc()), out)
        os._exit(1)  # skip atexit handlers that could wait on dead peers


def run_distributed_test(
    fn, world_size: int, *args, timeout_s: float = 120.0, accelerator: str = CUDA_ONLY_BACKEND
) -> list:
    """Run fn(rank, world_size, *args) on `world_size` ranks; per-rank results.
    accelerator: the backend for CUDA tensors ("auto": NCCL/RCCL, for `gpu` tests)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dist-test-") as out_dir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, port, out_dir, timeout_s, accelerator, fn, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while any(p.is_alive() for p in procs):
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()  # give the others a moment to report, then stop
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now - failed_at > 5.0):
                break
            time.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)

        results, errors = [], []
        for rank, p in enumerate(procs):
            path = Path(out_dir) / f"rank{rank}.pt"
            if not path.exists():
                errors.append(f"rank {rank}: no result (exit code {p.exitcode}; hung or killed)")
                results.append(None)
                continue
            status, value = torch.load(path, weights_only=False)
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            # Report real tracebacks before "no result" lines from ranks stopped afterwards.
            errors.sort(key=lambda e: "no result" in e)
            raise AssertionError(
                f"distributed test {fn.__name__} (world {world_size}):\n" + "\n".join(errors)
            )
        return results
