"""`megatron-ext describe MODEL [FIELD=VALUE ...] [--tp N] [--json]`: config and parameter counts.

MODEL is a preset name (`megatron-ext describe --list` lists them) or a YAML file of
ModelConfig fields (optionally `preset:` plus fields). Counts are measured on a meta-device
build (nothing is allocated), so they are exactly what training instantiates.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_ext import config as config_io
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.model import count_parameters
from megatron_ext.models.presets import PRESETS, load_model_yaml, resolve_model_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="preset name or model YAML file")
    parser.add_argument("overrides", nargs="*", help="field=value overrides, e.g. seq_length=4096")
    parser.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="override (repeatable)"
    )
    parser.add_argument("--tp", type=int, default=1, help="TP size for the vocabulary padding")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")


def load_model_config(model: str, overrides: list[str] = ()) -> ModelConfig:
    """A preset name or a YAML path, then `field=value` overrides."""
    if Path(model).suffix in (".yaml", ".yml") or Path(model).is_file():
        return load_model_yaml(model, list(overrides))
    data = config_io.apply_overrides({"preset": model}, list(overrides))
    return resolve_model_config(data)  # derived fields (FFN size, kv heads) follow the overrides


def describe(model: str, overrides: list[str] = (), tp_size: int = 1) -> dict:
    """The JSON document `describe --json` prints."""
    config = load_model_config(model, overrides)
    config.check_tp(tp_size)
    counts = count_parameters(config, tp_size)
    return {"model": model, **counts, "config": config.to_dict()}


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _print_table(doc: dict) -> None:
    cfg = doc["config"]
    print(f"{doc['model']}: {cfg['family']} recipe, {cfg['num_layers']} layers, hidden "
          f"{cfg['hidden_size']}, heads {cfg['num_attention_heads']} (kv {cfg['num_kv_heads']}), "
          f"FFN {cfg['ffn_hidden_size']}, {cfg['position_embedding']}, {cfg['norm']}, "
          f"{cfg['activation']}, seq {cfg['seq_length']}")  # fmt: skip
    print(f"  parameters         {doc['num_parameters']:>18,}  ({_human(doc['num_parameters'])})")
    print(
        f"  with vocab padding {doc['num_parameters_padded']:>18,}  "
        f"(vocab {doc['vocab_size']:,} -> {doc['padded_vocab_size']:,} at tp={doc['tp_size']})"
    )
    for name, n in doc["parts"].items():
        print(f"    {name:<20} {n:>16,}")
    for name, n in doc["per_layer"].items():
        print(f"    per layer {name:<10} {n:>16,}")


def run(args: argparse.Namespace) -> int:
    if args.list or not args.model:
        for name in PRESETS:
            print(name)
        return 0
    doc = describe(args.model, [*args.overrides, *args.set], args.tp)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_table(doc)
    return 0
