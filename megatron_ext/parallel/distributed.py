"""Process-group set-up shared by the trainer, the tools and the tests; which errors are
communication failures.

Backend. One plain backend per job breaks on GPUs: a NCCL/RCCL group has no CPU path, but the
trainer all-reduces small CPU tensors (the per-step stop agreement, the resume agreement) and
gathers Python objects. Every group therefore gets a device map, as torchtitan and OLMo-core do:

    "cpu:gloo,cuda:nccl"   on CUDA and ROCm (ROCm torch answers as "cuda"; "nccl" is RCCL there)
    "cpu:gloo"             on CPU-only machines (the same code path, one entry)

Groups made later with `dist.new_group` (ours, DeepSpeed's) inherit the map. The tests run
their process groups through `init_process_group` below with a CUDA-only stand-in for NCCL
(`accelerator=` a backend registered for the "cuda" device only), so a CPU tensor reaching a
group without a CPU backend fails in CI exactly as it would on a GPU.

Device. `bind_device` pins this process to GPU LOCAL_RANK (`torch.cuda.set_device`) before
anything touches CUDA; without it every rank's tensors and the tensor-parallel RNG tracker land
on cuda:0. We do not pass `device_id` to `init_process_group`: it makes every later `new_group`
(DeepSpeed makes one per grid row and column) an eager, world-wide NCCL communicator split, and
DeepSpeed itself leaves it out at world size 1 after CUDA errors there (deepspeed/comm/torch.py).
On GPU runs the gloo half connects lazily (TORCH_GLOO_LAZY_INIT), so hundreds of groups do not
each open a full gloo mesh at start-up for the few CPU tensors the trainer agrees on.

On NCCL a collective that outlives `train.collective_timeout_s` is aborted by torch's watchdog,
which ends the process (SIGABRT, "Watchdog caught collective operation timeout" in the log)
rather than raising; the launcher (srun --kill-on-bad-exit, torchrun) then ends the job and the
last complete checkpoint stays `latest`. On gloo the timeout raises and is named (exit code 4).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from megatron_ext.errors import UserError


def accelerator_backend() -> str | None:
    """The collective backend for GPU tensors on this machine: "nccl" (RCCL on ROCm) or None."""
    return "nccl" if torch.cuda.is_available() else None


def backend_spec(accelerator: str | None) -> str:
    """The device map given to `init_process_group`: gloo for CPU tensors, `accelerator` for
    CUDA/ROCm tensors."""
    return "cpu:gloo" if accelerator is None else f"cpu:gloo,cuda:{accelerator}"


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK, set by every launcher we support)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def bind_device(rank_on_node: int | None = None) -> torch.device:
    """Pin this process to its GPU (LOCAL_RANK) and return it; CPU where there is no GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = local_rank() if rank_on_node is None else rank_on_node
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(
            f"LOCAL_RANK={index} but this node shows {count} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start "
            "one process per GPU (Slurm: --ntasks-per-node equal to --gpus-per-node)"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def current_device() -> torch.device:
    """The device this process computes on: its bound GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_process_group(
    timeout_s: float,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    accelerator: str | None = "auto",
) -> torch.device:
    """Bind the device, then create the default group with a device map (see the module
    docstring); returns this process's device. Reads RANK/WORLD_SIZE/MASTER_* by default.

    accelerator: "auto" picks NCCL/RCCL when there is a GPU; tests pass a stand-in."""
    accel = accelerator_backend() if accelerator == "auto" else accelerator
    device = bind_device()
    if device.type == "cuda":
        os.environ.setdefault("TORCH_GLOO_LAZY_INIT", "1")
    dist.init_process_group(
        backend_spec(accel),
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=int(os.environ.get("RANK", "0")) if rank is None else rank,
        world_size=int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size,
    )
    return device


def set_group_timeouts(timeout_s: float) -> int:
    """Give every process group of this process the collective timeout TIMEOUT_S (new groups
    get torch's default, not init_process_group's); returns how many groups."""
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    groups = list(c10d._world.pg_map)
    for group in groups:
        c10d._set_pg_timeout(timeout, group)
    return len(groups)


# Fallback only: torch raises DistError subclasses for most backend failures, but a few paths
# (gloo's pair transport, older DeepSpeed p2p) still raise plain RuntimeError with these texts.
_FAILURE_PATTERNS = (
    "connection closed by peer",
    "connection reset by peer",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout waiting",
    "nccl error",
    "ncclremoteerror",
    "ncclsystemerror",
    "ncclinternalerror",
    "watchdog caught collective",
    "process group watchdog",
)


def is_communication_failure(exc: BaseException) -> bool:
    """True when `exc` means a collective could not complete (a peer died or hangs, the
    network failed, the collective timed out); False for everything else, an out-of-memory
    or a shape bug inside a step included, which keep their own traceback and exit code."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(pattern in text for pattern in _FAILURE_PATTERNS)


def all_agree(ok: bool) -> bool:
    """True when OK on every rank (collective; a CPU tensor: gloo carries it beside NCCL/RCCL,
    so a rank whose GPU fails can still answer)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


HOST_BYTES = 64


def gather_from_hosts(values: list[float]) -> list[tuple[str, list[float]]]:
    """(host name, VALUES) of every rank, in rank order (collective). Through a CPU tensor, so
    gloo carries it beside NCCL/RCCL: it works when a rank's GPU does not."""
    import socket

    host = socket.gethostname().encode()[:HOST_BYTES]
    mine = torch.zeros(HOST_BYTES + len(values), dtype=torch.float64)
    mine[: len(host)] = torch.tensor(list(host), dtype=torch.float64)
    mine[HOST_BYTES:] = torch.tensor(values, dtype=torch.float64)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [
        (
            bytes(int(b) for b in t[:HOST_BYTES] if b).decode(errors="replace"),
            t[HOST_BYTES:].tolist(),
        )
        for t in everyone
    ]
