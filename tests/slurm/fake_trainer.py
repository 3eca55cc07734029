"""A stand-in for `megatron-ext train` that keeps the trainer's contract, for the slurm tests.

    python tests/slurm/fake_trainer.py --config RUN.yaml [dotted.key=value ...]

Contract kept: ranks from the environment (torchrun-style variables exported by the rendered
script, else Slurm's), gloo process group on MASTER_ADDR:MASTER_PORT; checkpoints
`<checkpoint.dir>/iter_XXXXXXX/` written under a temporary name and renamed, then `latest`
replaced atomically; `metrics.jsonl` (step, loss, tokens_per_s); resume from `latest`; SIGUSR1 or
SIGTERM -> save at the next step boundary and exit 0; `train.iterations` reached -> exit 0 at once.

What it trains: a tiny linear regression with data-parallel gradients (all-reduce over gloo) and
SGD with momentum; the data of step k depends only on k and the rank, so an interrupted and
resumed run ends with exactly the loss of an uninterrupted one. Test knobs under `fake:`:
`step_seconds`; `crash_at_step` (exit 3 there); `hold_at_step` (a first job stops at that step
and waits for USR1/SIGTERM, so "interrupted once, then finished" does not depend on how fast this
machine is; a job resumed from there goes on).
"""

from __future__ import annotations

import signal

STOP = {"signal": None}


def _on_signal(signum, frame):  # installed first: USR1 may come before torch is imported
    STOP["signal"] = signum


signal.signal(signal.SIGUSR1, _on_signal)
signal.signal(signal.SIGTERM, _on_signal)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from megatron_ext.launch.run_config import get, load_run_config  # noqa: E402
from megatron_ext.parallel.rank_env import dist_env  # noqa: E402

DIM = 16


def read_latest(ckpt: Path) -> int:
    latest = ckpt / "latest"
    if not latest.is_file():
        return 0
    return int(latest.read_text().strip().removeprefix("iter_"))


def save(ckpt: Path, step: int, model, opt) -> None:
    import torch

    name = f"iter_{step:07d}"
    tmp = ckpt / f".{name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"step": step, "model": model.state_dict(), "optim": opt.state_dict()}, tmp / "state.pt"
    )
    final = ckpt / name
    if final.exists():
        import shutil

        shutil.rmtree(final)
    os.replace(tmp, final)
    (ckpt / "latest.tmp").write_text(name + "\n")
    os.replace(ckpt / "latest.tmp", ckpt / "latest")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_run_config(args.config, args.overrides)
    ckpt = Path(get(cfg, "checkpoint.dir"))
    iterations = int(get(cfg, "train.iterations"))
    interval = int(get(cfg, "checkpoint.interval", 10))
    step_seconds = float(get(cfg, "fake.step_seconds", 0.0))
    crash_at = get(cfg, "fake.crash_at_step")
    hold_at = get(cfg, "fake.hold_at_step")
    gbs = int(get(cfg, "train.global_batch_size"))
    seq = int(get(cfg, "data.seq_length", 8))
    ckpt.mkdir(parents=True, exist_ok=True)

    start = read_latest(ckpt)
    if start >= iterations:
        print(f"fake_trainer: iteration {start} >= {iterations}: nothing to do", flush=True)
        return 0

    env = dist_env()
    with open(ckpt / "ranks.jsonl", "a") as f:
        rec = {
            **env.torch_env(),
            "host": socket.gethostname(),
            "job": os.environ.get("SLURM_JOB_ID"),
        }
        rec["slurmd_node"] = os.environ.get("SLURMD_NODENAME")
        f.write(json.dumps(rec) + "\n")

    import torch
    import torch.distributed as dist

    os.environ.update(env.torch_env())
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if start:
        state = torch.load(ckpt / f"iter_{start:07d}" / "state.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
    target_w = torch.linspace(-1, 1, DIM)

    step = start
    t_last = time.time()
    while step < iterations:
        flag = torch.tensor([1.0 if STOP["signal"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            break
        if hold_at is not None and step == int(hold_at) and start < step:
            time.sleep(0.2)  # a long run, made deterministic: wait here for USR1/SIGTERM
            continue
        step += 1
        if crash_at is not None and step == int(crash_at):
            print(f"fake_trainer: crashing at step {step} (fake.crash_at_step)", flush=True)
            return 3
        g = torch.Generator().manual_seed(step * 1000 + env.rank)
        x = torch.randn(32, DIM, generator=g)
        y = x @ target_w + 0.1 * torch.randn(32, generator=g)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= env.world_size
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if step_seconds:
            time.sleep(step_seconds)
        now = time.time()
        if env.rank == 0:
            rec = {
                "step": step,
                "loss": mean_loss.item() / env.world_size,
                "tokens_per_s": gbs * seq / max(now - t_last, 1e-9),
                "job_id": os.environ.get("SLURM_JOB_ID"),
            }
            with open(ckpt / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if step % interval == 0 or step == iterations:
                save(ckpt, step, model, opt)
        t_last = now
    if env.rank == 0 and read_latest(ckpt) < step:
        save(ckpt, step, model, opt)
    dist.barrier()
    dist.destroy_process_group()
    why = f"signal {STOP['signal']}" if step < iterations else "done"
    print(f"fake_trainer: rank {env.rank} exits at step {step} ({why})", flush=True)
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    # Skip interpreter teardown: gloo's threads occasionally abort there ("terminate called
    # without an active exception", exit 134) after a clean destroy_process_group.
    os._exit(rc)
