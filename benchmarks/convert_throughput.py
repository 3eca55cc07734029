#!/usr/bin/env python3
"""Checkpoint conversion: throughput (GB/s) and peak RSS of `megatron-ext convert` against the
way the older scripts convert (whole checkpoint in memory, transformers' `save_pretrained`).

    python benchmarks/convert_throughput.py                       # 2.5 GB synthetic BLOOM
    python benchmarks/convert_throughput.py --size-gb 0.3         # smoke test
    python benchmarks/convert_throughput.py --repeats 2 --record benchmarks/results/convert.md

Input: a synthetic BloomForCausalLM checkpoint (random fp32 weights; hidden 2048, 16 heads,
vocabulary 32000, as many layers as --size-gb allows), HF safetensors in 1 GB shards with an
index, written once to --work-dir (streamed, one tensor in memory at a time) and cached.

Sides, each a fresh subprocess timed from launch to exit (interpreter start and imports
included); its peak RSS is the kernel's ru_maxrss of that child (os.wait4):

- ours from-hf: `python -m megatron_ext convert from-hf --hf-dir HF --output CKPT --tp 1 --pp 1`
  (HF -> our trainer checkpoint, per-layer files);
- ours to-hf: `python -m megatron_ext convert to-hf --checkpoint CKPT --output OUT
  --max-shard-size 1GB` (back to HF safetensors);
- baseline: `python benchmarks/convert_throughput.py baseline HF OUT 1GB`, the way the older
  converters work: build the model from its config (`AutoModelForCausalLM.from_config`, as
  transformers' convert_bloom_original_checkpoint_to_pytorch.py builds `BloomModel(config)`),
  load the whole state dict (every shard), `load_state_dict`, `save_pretrained` with the same
  max_shard_size.
Throughput = the checkpoint's tensor bytes / wall seconds. Every side's output is compared with
the input tensor by tensor (bit-identical, or the script stops with exit code 1). Before each
run the input files are read once so that every side starts with them in the page cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARD = "1GB"
GB = 1e9


# ------------------------------------------------------------------------ synthetic checkpoint


def synthetic_config(size_gb: float):
    """BLOOM shapes (hidden 2048, 16 heads, vocab 32000) with about size_gb GB of fp32."""
    from megatron_ext.models import ModelConfig

    hidden, vocab = 2048, 32000
    per_layer = (12 * hidden * hidden + 13 * hidden) * 4
    layers = max(1, round((size_gb * GB - vocab * hidden * 4) / per_layer))
    return ModelConfig(
        family="bloom", num_layers=layers, hidden_size=hidden, num_attention_heads=16,
        vocab_size=vocab, seq_length=2048,
    )  # fmt: skip


def make(out: Path, size_gb: float) -> None:
    from megatron_ext.convert.synthetic import write_synthetic_hf

    write_synthetic_hf(out, synthetic_config(size_gb))


# ------------------------------------------------------------------ baseline (older scripts)


def baseline(hf_dir: Path, out: Path, max_shard_size: str) -> None:
    """Whole checkpoint in memory: model from config, full state dict, save_pretrained."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    state = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - {"lm_head.weight"}  # tied to the word embeddings
    if result.unexpected_keys or missing:
        raise SystemExit(f"baseline: unexpected {result.unexpected_keys}, missing {missing}")
    del state
    model.save_pretrained(out, max_shard_size=max_shard_size)


# ------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    side: str
    seconds: float
    peak_rss: int  # bytes

    def gbps(self, nbytes: int) -> float:
        return nbytes / GB / self.seconds


def run_child(side: str, cmd: list[str], log: Path) -> Run:
    """Run `cmd`; wall time from launch to exit and the child's own ru_maxrss (os.wait4)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed (exit {proc.returncode}); see {log}")
    return Run(side, seconds, usage.ru_maxrss * 1024)


def warm(directory: Path) -> None:
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def check_identical(expected: Path, got: Path, side: str) -> None:
    """Every tensor of `expected` is in `got`, bit-identical (one tensor in memory at a time)."""
    import torch

    from megatron_ext.convert.safetensors_io import HFCheckpoint

    a, b = HFCheckpoint(expected), HFCheckpoint(got)
    for name in a.keys():
        if name not in b or not torch.equal(a.get(name), b.get(name)):
            raise SystemExit(f"{side}: {name} differs from the input (or is missing) in {got}")


def measure(hf_dir: Path, work: Path) -> list[Run]:
    py = sys.executable
    ckpt, out_ours, out_base = work / "ours_ckpt", work / "ours_hf", work / "baseline_hf"
    for d in (ckpt, out_ours, out_base):
        shutil.rmtree(d, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    cli = [py, "-m", "megatron_ext", "convert"]
    runs = []
    warm(hf_dir)
    runs.append(
        run_child(
            "baseline (load all + save_pretrained)",
            [py, str(Path(__file__).resolve()), "baseline", str(hf_dir), str(out_base), SHARD],
            logs / "baseline.log",
        )
    )
    check_identical(hf_dir, out_base, "baseline")
    shutil.rmtree(out_base)
    warm(hf_dir)
    from_hf = [*cli, "from-hf", "--hf-dir", str(hf_dir), "--output", str(ckpt), "--tp", "1"]
    runs.append(run_child("ours: convert from-hf", [*from_hf, "--pp", "1"], logs / "from_hf.log"))
    to_hf = [*cli, "to-hf", "--checkpoint", str(ckpt), "--output", str(out_ours)]
    runs.append(
        run_child("ours: convert to-hf", [*to_hf, "--max-shard-size", SHARD], logs / "to_hf.log")
    )
    check_identical(hf_dir, out_ours, "ours (from-hf + to-hf)")
    for d in (ckpt, out_ours):
        shutil.rmtree(d)
    return runs


# ---------------------------------------------------------------------------------- report


def report(args, hf_dir: Path, all_runs: list[list[Run]]) -> str:
    from megatron_ext.convert.safetensors_io import HFCheckpoint

    specs = HFCheckpoint(hf_dir).specs().values()
    nbytes, largest = sum(s.nbytes for s in specs), max(s.nbytes for s in specs)
    sides = [r.side for r in all_runs[0]]
    best = {s: min((r for runs in all_runs for r in runs if r.side == s), key=lambda r: r.seconds)
            for s in sides}  # fmt: skip
    peak = {s: max(r.peak_rss for runs in all_runs for r in runs if r.side == s) for s in sides}
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    lines = [
        f"- checkpoint: synthetic BloomForCausalLM fp32, {synthetic_config(args.size_gb).num_layers}"
        f" layers, hidden 2048, vocab 32000: {len(specs)} tensors, {nbytes / GB:.3f} GB, largest "
        f"tensor {mib(largest)} MiB; safetensors shards of {SHARD}",
        f"- repeats: {args.repeats} (fastest wall time per side; peak RSS: the largest seen)",
        "",
        "| side | wall s | GB/s | peak RSS MiB | peak RSS / largest tensor |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in sides:
        r = best[s]
        lines.append(
            f"| {s} | {r.seconds:.1f} | {r.gbps(nbytes):.3f} | {mib(peak[s])} | "
            f"{peak[s] / largest:.1f} |"
        )
    base = sides[0]
    lines += ["", "| figure | value | target | |", "|---|---:|---:|---|"]
    for s in sides[1:]:
        rss = peak[base] / peak[s]
        speed = best[s].gbps(nbytes) / best[base].gbps(nbytes)
        lines.append(
            f"| peak RSS baseline / {s} | {rss:.2f}x | >= 5x | "
            f"{'PASS' if rss >= 5 else 'FALL SHORT'} |"
        )
        lines.append(
            f"| GB/s {s} / baseline | {speed:.2f}x | >= 1.00x | "
            f"{'PASS' if speed >= 1 else 'FALL SHORT'} |"
        )
    lines += [
        "",
        "All outputs bit-identical to the input, tensor by tensor. Every run (wall s, peak RSS MiB):",
    ]
    for i, runs in enumerate(all_runs):
        each = "; ".join(f"{r.side} {r.seconds:.1f} s, {mib(r.peak_rss)}" for r in runs)
        paired = ", ".join(f"{runs[0].seconds / r.seconds:.2f}x" for r in runs[1:])
        lines.append(f"- repeat {i + 1}: {each} (GB/s ours / baseline in this repeat: {paired})")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "baseline":
        baseline(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.5, help="synthetic checkpoint size (2.5)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side (1)")
    p.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "work" / "convert")
    p.add_argument("--record", metavar="FILE.md", help="write the results as markdown here")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = args.work_dir / f"bloom_{args.size_gb:g}gb"
    if not hf_dir.exists():
        print(f"writing {hf_dir} ...", flush=True)
        make(hf_dir, args.size_gb)
    all_runs = []
    for i in range(args.repeats):
        runs = measure(hf_dir, args.work_dir)
        for r in runs:
            print(f"[{i + 1}/{args.repeats}] {r.side}: {r.seconds:.1f} s, "
                  f"peak RSS {r.peak_rss / 2**20:,.0f} MiB", flush=True)  # fmt: skip
        all_runs.append(runs)
    text = report(args, hf_dir, all_runs)
    print(text)
    if args.record:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        import torch
        import transformers

        head = [
            "# Checkpoint conversion: throughput and peak RSS",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            f"- machine: nproc {os.cpu_count()}, {platform.machine()}, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; "
            "load average (1, 5, 15 min) when recorded: "
            + ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, commit {commit}",
            f"- command: `python benchmarks/convert_throughput.py {' '.join(sys.argv[1:])}`",
        ]
        doc = (__doc__ or "").split("\n\n", 2)[2]
        Path(args.record).write_text("\n".join(head) + "\n" + text + "\n## Definitions\n\n" + doc)
        print(f"recorded in {args.record}")


if __name__ == "__main__":
    main()
