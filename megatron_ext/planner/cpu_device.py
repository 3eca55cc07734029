"""The CPU as a planner device, its constants measured by a micro-benchmark (a few seconds).

The throughput model (planner/throughput.py) needs a device's matrix throughput, memory
bandwidth and, for tp/pp > 1, its links. On a GPU they come from data sheets and published runs;
on this machine's CPU they are measured here, at the thread count the trainer's ranks use
(OMP_NUM_THREADS, 1 in the tests):
- matrix: fp32 matmuls of 512^3 (the size of the CPU shapes in benchmarks/results/planner.md),
  the median of 15: the sustained rate the model's efficiency 1.0 refers to;
- memory: a copy of 64 MiB fp32 (read + write), the median of 15;
- links: gloo all-reduces between the local processes, 8 MiB (bandwidth) and 4 bytes
  (latency); the same numbers serve as the "inter-node" links (one machine: the model's
  inter-node efficiency is divided out).
For a run of N local ranks the matrix and memory figures are measured in N processes at once
(they share the cores, caches and memory bus as the ranks do).
"""

from __future__ import annotations

import os
import time

import torch

from megatron_ext.planner.devices import Device, Links
from megatron_ext.planner.throughput import INTER_NODE_EFFICIENCY


def _best(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _median(fn, repeats: int = 15) -> float:
    """The median time: a sustained rate, as a training step sees it (not the best burst)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_gflops(n: int = 512) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    return 2 * n**3 / _median(lambda: a @ b) / 1e9


def copy_gb_s(mib: int = 64) -> float:
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / _median(lambda: dst.copy_(src)) / 1e9


def _worker(rank: int, ranks: int, port: int, threads: int, out) -> None:
    """One of RANKS processes: matmul and copy speed while the others run the same (the cores,
    caches and memory are shared as in a RANKS-process run), then gloo all-reduce times."""
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    dist.barrier()
    gflops, gb_s = matmul_gflops(), copy_gb_s()
    big, small = torch.ones(8 * 2**20 // 4), torch.ones(1)
    for t in (big, small):
        dist.all_reduce(t)  # warm-up
    big_s = _best(lambda: dist.all_reduce(big))
    small_s = _best(lambda: dist.all_reduce(small), repeats=20)
    if rank == 0:
        out.put((gflops, gb_s, big_s, small_s))
    dist.barrier()
    dist.destroy_process_group()


def measure(ranks: int = 1, threads: int | None = None) -> tuple[Device, Links]:
    """This CPU as a Device for a run of RANKS local processes of THREADS threads each
    (default OMP_NUM_THREADS or 1), and gloo's all-reduce bandwidth and latency as Links."""
    import psutil
    import torch.multiprocessing as mp

    from megatron_ext.training.ranks import free_port

    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    n = max(2, ranks)  # links need two processes
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, n, port, threads, out)) for r in range(n)]
    for p in procs:
        p.start()
    gflops, gb_s, big_s, small_s = out.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    if ranks == 1:  # one rank has the machine to itself
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            gflops, gb_s = matmul_gflops(), copy_gb_s()
        finally:
            torch.set_num_threads(old)
    link_gb_s = 2 * (n - 1) / n * (8 * 2**20) / max(big_s - small_s, 1e-9) / 1e9
    latency = small_s / (2 * (n - 1))
    memory = psutil.virtual_memory().total / 2**30
    device = Device("cpu", gflops / 1000, gb_s, memory, "cpu")
    links = Links("cpu-gloo", link_gb_s, 64, link_gb_s, link_gb_s / INTER_NODE_EFFICIENCY,
                  latency, latency)  # fmt: skip
    return device, links
