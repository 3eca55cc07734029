"""`megatron-ext inspect-blend` and `megatron-ext build-index`.

inspect-blend: how a blend turns into samples for one split (tokens, target weight, samples,
realised fraction, epochs per source) without building any source index.
build-index: build (or check) every index a training run will load, on one node, before the
big job starts; the run must use the same seq length, sample counts, split and seed.
"""

from __future__ import annotations

import argparse
import json
import time

from megatron_ext.data.blend import (
    SPLITS,
    BlendConfig,
    as_blend,
    build_datasets,
    plan_blend,
)
from megatron_ext.data.gpt_dataset import GPTDatasetConfig
from megatron_ext.errors import UserError

DEFAULT_CACHE_DIR = "index-cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    command = p.prog.split()[-1]
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--blend", metavar="YAML", help="blend file: a list of {path, weight|upsample, name}"
    )
    source.add_argument(
        "--data-path",
        nargs="+",
        metavar="W P",
        help="Megatron style: W1 PREFIX1 W2 PREFIX2 ... or prefixes",
    )
    p.add_argument(
        "--seq-length", type=int, required=True, help="tokens per sample (plus one for labels)"
    )
    if command == "build-index":
        for split in SPLITS:
            p.add_argument(
                f"--{split}-samples", type=int, default=0, help=f"samples of the {split} split"
            )
    else:
        p.add_argument("--num-samples", type=int, required=True, help="samples of --split")
        p.add_argument(
            "--split", choices=SPLITS, default="train", help="which split (default train)"
        )
    p.add_argument(
        "--data-split",
        default="969,30,1",
        help="train,valid,test document proportions (default 969,30,1)",
    )
    p.add_argument("--seed", type=int, default=1234, help="shuffle seed (default 1234)")
    p.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
        help=f"index cache directory (default ./{DEFAULT_CACHE_DIR})",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _blend(args: argparse.Namespace) -> BlendConfig:
    return BlendConfig.from_yaml(args.blend) if args.blend else as_blend(args.data_path)


def run(args: argparse.Namespace) -> int:
    if args.seq_length < 1:
        raise UserError(f"--seq-length must be at least 1 (got {args.seq_length})")
    return _build_index(args) if args.command == "build-index" else _inspect(args)


def _inspect(args: argparse.Namespace) -> int:
    config = GPTDatasetConfig(args.seq_length, args.seed, args.data_split, args.cache_dir)
    plan, _ = plan_blend(_blend(args), args.split, args.num_samples, config, write_cache=False)
    if args.json:
        print(json.dumps({**plan.to_json(), "cache_dir": args.cache_dir}, indent=2))
    else:
        print(plan.table())
        print("".join(f"warning: {w}\n" for w in plan.warnings()), end="")
        print(f"blending index cache: {plan.cache_path}")
    return 0


def _build_index(args: argparse.Namespace) -> int:
    counts = [getattr(args, f"{split}_samples") for split in SPLITS]
    if not any(counts):
        raise UserError(
            "nothing to build: give --train-samples (and --valid-samples, --test-samples)"
        )
    start = time.perf_counter()
    datasets = build_datasets(
        _blend(args),
        args.seq_length,
        counts,
        split=args.data_split,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    result = {
        "cache_dir": args.cache_dir,
        "seconds": round(time.perf_counter() - start, 3),
        "splits": {},
    }
    for split, ds in zip(SPLITS, datasets, strict=True):
        if ds is None:
            continue
        parts = getattr(ds, "datasets", [ds])
        result["splits"][split] = {
            "samples": len(ds),
            "blend_cache_path": getattr(getattr(ds, "plan", None), "cache_path", None),
            "source_cache_paths": [p.cache_path for p in parts if p is not None],
        }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for split, info in result["splits"].items():
            print(f"{split}: {info['samples']:,} samples; indices under {args.cache_dir}")
        print(f"done in {result['seconds']:.1f} s")
    return 0
