#!/usr/bin/env python3
"""Checkpoint checksums: what they cost when saving and loading, against plain torch.save/load.

    python benchmarks/checkpoint_checksums.py                  # 1 GB in 4 files
    python benchmarks/checkpoint_checksums.py --size-gb 0.2    # smoke test
    python benchmarks/checkpoint_checksums.py --record benchmarks/results/checkpoint_checksums.md

Files: --files shards of random fp32 tensors (64 MB each tensor), --size-gb in all, in
--work-dir. Sides, each timed over the same files (best of --repeats), page cache warm:
- baseline save: torch.save(state, path);
- ours save: checkpoint_format.save_file (torch.save through a writer that computes the CRC-32
  as the bytes pass), then write_manifest with those checksums;
- baseline load: torch.load(path, weights_only=True) of each file;
- ours load: checkpoint_format.load_file(path, manifest): the file's CRC-32 checked against the
  manifest (one read), then torch.load(weights_only=True), as every rank does for its files;
- verify only: Manifest.check_contents (every file, 4 threads), as a layout change does before
  converting: reported in GB/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import append_record, best  # noqa: E402

from megatron_ext import checkpoint_format  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work-dir", default="/tmp/megatron-ext-bench-checksums")
    p.add_argument("--record", help="append the results to this markdown file")
    args = p.parse_args(argv)

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "plain").mkdir(parents=True)
    (work / "ours").mkdir()
    numel = 16 << 20  # 64 MB of fp32
    per_file = max(1, int(args.size_gb * 2**30 / args.files / (numel * 4)))
    gen = torch.Generator().manual_seed(0)
    states = [
        {f"t{i}": torch.randn(numel, generator=gen) for i in range(per_file)}
        for _ in range(args.files)
    ]
    names = [f"layer_{i:02d}-model_00-model_states.pt" for i in range(args.files)]

    def save_plain():
        for name, sd in zip(names, states, strict=True):
            torch.save(sd, work / "plain" / name)

    def save_ours():
        written = {name: checkpoint_format.save_file(sd, work / "ours" / name)
                   for name, sd in zip(names, states, strict=True)}  # fmt: skip
        checkpoint_format.write_manifest(work / "ours", written)

    t_save_plain = best(save_plain, args.repeats)
    t_save_ours = best(save_ours, args.repeats)
    manifest = checkpoint_format.Manifest(work / "ours")
    nbytes = sum(m["size"] for m in manifest.files.values())

    def load_plain():
        for name in names:
            torch.load(work / "plain" / name, weights_only=True)

    def load_ours():
        for name in names:
            checkpoint_format.load_file(work / "ours" / name, manifest)

    def verify_only():
        assert manifest.check_contents(workers=4) is None

    load_plain()  # warm the page cache for both
    load_ours()
    t_load_plain = best(load_plain, args.repeats)
    t_load_ours = best(load_ours, args.repeats)
    t_verify = best(verify_only, args.repeats)
    gb = nbytes / 1e9
    rows = [
        ("save", t_save_plain, t_save_ours),
        ("load", t_load_plain, t_load_ours),
    ]
    lines = [
        f"checkpoint checksums, {gb:.2f} GB in {args.files} files, best of {args.repeats}, "
        f"{platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}",
        "| step | baseline torch s | ours (CRC-32) s | ours / baseline | ours GB/s |",
        "|---|---|---|---|---|",
    ]
    for step, base, ours in rows:
        lines.append(f"| {step} | {base:.3f} | {ours:.3f} | {ours / base:.2f} | {gb / ours:.2f} |")
    lines.append(f"| verify only (4 threads) | | {t_verify:.3f} | | {gb / t_verify:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.record:
        append_record(
            args.record, "checkpoint_checksums.py", sys.argv[1:] if argv is None else argv, text
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
