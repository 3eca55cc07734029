"""The pre-flight check at start-up (train.preflight, on by default; well under a second).

Before the model is built every rank checks that it sees its device (a small allocation on it),
then times an all-reduce and a ring send/recv (to rank + 1, from rank - 1) of a known size over
all ranks (best of three). A rank whose device fails or whose bandwidth is below
train.preflight_min_gbps (default: 1 GB/s on GPUs, 0.01 on CPU) is named with its host, and the
run stops (exit 5) with the `--exclude` list to resubmit the Slurm job with. The results are
shared through CPU tensors (gloo beside NCCL/RCCL), so a rank whose GPU is broken still reports.
"""

from __future__ import annotations

import socket
import time

import torch
import torch.distributed as dist

from megatron_ext.log import get_logger
from megatron_ext.parallel import distributed

log = get_logger(__name__)

REPEATS = 3


class PreflightError(RuntimeError):
    """A device or link failed the pre-flight check (the message names ranks and hosts)."""


def check(min_gbps: float | None = None, nbytes: int | None = None) -> list[dict]:
    """Run the check on every rank (collective); the per-rank results, or PreflightError."""
    device = distributed.current_device()
    floor = min_gbps or (1.0 if device.type == "cuda" else 0.01)
    nbytes = nbytes or (64 if device.type == "cuda" else 4) * 2**20
    started = time.perf_counter()
    problem = _device_problem(device)
    if not distributed.all_agree(problem is None):
        rows = _gather(problem, 0.0, 0.0)
    elif dist.get_world_size() == 1:
        rows = [_row(0, socket.gethostname(), None, float("inf"), float("inf"))]
    else:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        rows = _gather(None, _allreduce_gbps(buf), _ring_gbps(buf))
    failures = failing(rows, floor)
    if failures:
        raise PreflightError(failures)
    if dist.get_rank() == 0:
        log.info(
            "pre-flight: %d ranks see their devices; all-reduce >= %.3g GB/s, send/recv >= %.3g "
            "GB/s (minimum %.3g) in %.2f s",
            len(rows),
            min(r["allreduce_gbps"] for r in rows),
            min(r["sendrecv_gbps"] for r in rows),
            floor,
            time.perf_counter() - started,
        )
    return rows


def failing(rows: list[dict], floor: float) -> str | None:
    """The message naming each rank whose device fails or whose send/recv is below FLOOR (with
    the hosts to exclude), and an all-reduce below FLOOR (a figure of the whole group: it names
    no rank); None when all pass."""
    lines, hosts = [], []
    for r in rows:
        why = r["device_problem"]
        if why is None and r["sendrecv_gbps"] < floor:
            why = f"send/recv {r['sendrecv_gbps']:.3g} GB/s < minimum {floor:g} GB/s"
        if why is not None:
            lines.append(f"rank {r['rank']} on {r['host']}: {why}")
            hosts.append(r["host"])
    allreduce = min(r["allreduce_gbps"] for r in rows)
    if allreduce < floor and not any(r["device_problem"] for r in rows):
        lines.append(
            f"all-reduce over {len(rows)} ranks: {allreduce:.3g} GB/s < minimum {floor:g} GB/s"
            + ("" if hosts else " (no single link is slow: the network as a whole)")
        )
    if not lines:
        return None
    exclude = (
        f"Resubmit without those nodes: megatron-ext slurm submit ... --exclude "
        f"{','.join(dict.fromkeys(hosts))} (a slow send/recv names the ranks on both ends of a "
        "slow link). "
        if hosts
        else ""
    )
    return (
        "pre-flight check failed:\n  " + "\n  ".join(lines) + f"\n{exclude}"
        "train.preflight_min_gbps sets the minimum, train.preflight=false skips the check"
    )


def _device_problem(device: torch.device) -> str | None:
    try:
        torch.ones(1024, device=device).sum().item()
    except RuntimeError as exc:
        return f"its device {device} fails: {str(exc).splitlines()[0][:200]}"
    return None


def _timed(fn, device: torch.device) -> float:
    """The best of REPEATS timings of fn() (after one warm-up), in seconds; all ranks start each
    together (a barrier), so a slow link delays only the ranks at its two ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(REPEATS):
        dist.barrier()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _allreduce_gbps(buf: torch.Tensor) -> float:
    """Bus bandwidth of an all-reduce (the nccl-tests convention: 2 (n - 1) / n x bytes / s)."""
    n = dist.get_world_size()
    seconds = _timed(lambda: dist.all_reduce(buf), buf.device)
    return 2 * (n - 1) / n * buf.numel() * buf.element_size() / seconds / 1e9


def _ring_gbps(buf: torch.Tensor) -> float:
    """This rank's send to rank + 1 while it receives from rank - 1."""
    rank, n = dist.get_rank(), dist.get_world_size()
    inbox = torch.empty_like(buf)

    def exchange():
        ops = [
            dist.P2POp(dist.isend, buf, (rank + 1) % n),
            dist.P2POp(dist.irecv, inbox, (rank - 1) % n),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()

    seconds = _timed(exchange, buf.device)
    return buf.numel() * buf.element_size() / seconds / 1e9


def _row(rank, host, problem, allreduce, sendrecv) -> dict:
    return {
        "rank": rank,
        "host": host,
        "device_problem": problem,
        "allreduce_gbps": allreduce,
        "sendrecv_gbps": sendrecv,
    }


def _gather(problem: str | None, allreduce: float, sendrecv: float) -> list[dict]:
    """Every rank's results (a rank whose device failed says why in its own log)."""
    rows = []
    values = [float(problem is not None), allreduce, sendrecv]
    for rank, (host, (failed, ar, sr)) in enumerate(distributed.gather_from_hosts(values)):
        why = None
        if failed:
            why = problem if rank == dist.get_rank() else "its device fails (see that rank's log)"
        rows.append(_row(rank, host, why, ar, sr))
    return rows
