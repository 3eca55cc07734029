"""The conversion driver for every model family: HF <-> our TP/PP shards, streamed.

A family contributes only its key map (megatron_ext/models/<family>.py); this module walks it
one pipeline layer at a time. Memory: HF -> ours holds one (layer, tp rank) output shard plus
the one full tensor being split; ours -> HF holds the tp shards of one parameter, their merge
and its HF parts (a few tensors). Tensors keep their dtype, so a round trip is bit-identical.

    iter_from_hf(get_hf, family, config, tp_size)  -> (PipeLayer, tp_rank, {our name: shard})
    iter_to_hf(get_shard, family, config, tp_size) -> (HF name, tensor), padding removed
    write_hf(out_dir, ...)                         -> shards + index, config.json,
                                                      generation_config.json, tokenizer, README
    export_hf(checkpoint, output, ...)             -> a trainer checkpoint (any tp, pp) as a
                                                      HF model directory (trainer_ckpt.py reads it)
    hf_to_pipeline_checkpoint(hf_dir, out, tp, pp) -> a trainer checkpoint for --reset-progress

Both directions check every tensor's shape against the config (config.json, config.yaml)
before writing anything (shapes.py); tokenizer files go through hf_tokenizer.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from megatron_ext import precision
from megatron_ext.config import dump_yaml
from megatron_ext.convert import layout, shapes
from megatron_ext.convert.hf_tokenizer import special_token_ids, write_tokenizer_files
from megatron_ext.convert.safetensors_io import (
    HFCheckpoint,
    ShardedSafetensorsWriter,
    TensorSpec,
    atomic_output_dir,
    parse_size,
    read_json_object,
)
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import SPLITS, TRANSFORMS, ModelFamily
from megatron_ext.models.presets import FAMILIES

log = get_logger(__name__)

GetHF = Callable[[str], torch.Tensor]
GetShard = Callable[[int, str], torch.Tensor]
HF_SIZE_KEYS = (  # config.json sizes under the names HF configs use for them
    "vocab_size", "hidden_size", "n_embed", "n_layer", "num_hidden_layers", "n_head",
    "num_attention_heads", "num_key_value_heads", "intermediate_size", "max_position_embeddings",
)  # fmt: skip
DTYPE_NAMES = precision.DTYPES


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[dtype]


def family_of(hf_config: dict, where: str) -> ModelFamily:
    archs = hf_config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    for family in FAMILIES.values():
        if family.hf_architecture == arch or family.name == hf_config.get("model_type"):
            return family
    known = ", ".join(f.hf_architecture for f in FAMILIES.values())
    raise UserError(f"{where}: architecture {arch!r} has no key map; supported: {known}")


def read_hf_config(hf_dir: str | Path) -> tuple[ModelFamily, ModelConfig]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; give a Hugging Face model directory")
    hf_config = read_json_object(path, "fix it", " (a Hugging Face model config)")
    family = family_of(hf_config, str(path))
    bad = [k for k in HF_SIZE_KEYS if hf_config.get(k) is not None]
    bad = [k for k in bad if type(hf_config[k]) is not int]
    if bad:
        raise UserError(f"{path}: {bad[0]} is {hf_config[bad[0]]!r:.50}, not an integer")
    try:
        return family, family.from_hf_config(hf_config)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f"{path}: missing or invalid field for {family.hf_architecture} ({exc!r:.200})"
        ) from None


def read_hf_input(hf_dir: str | Path) -> tuple[ModelFamily, ModelConfig, HFCheckpoint]:
    """config.json and the weights of a HF dir, every tensor's shape checked against it."""
    family, config = read_hf_config(hf_dir)
    ckpt = HFCheckpoint(hf_dir)
    shapes.check_hf_tensors(ckpt, family, config, Path(hf_dir) / "config.json")
    return family, config, ckpt


def iter_from_hf(
    get_hf: GetHF, family: ModelFamily, config: ModelConfig, tp_size: int
) -> Iterator[tuple[layout.PipeLayer, int, dict[str, torch.Tensor]]]:
    """Our state dict of each (pipeline layer, tp rank), one at a time.

    Each HF tensor is read once per tp rank (from the page cache after the first), so only one
    full tensor and one output shard are in memory.
    """
    config.check_tp(tp_size)
    for layer, entries in layout.entries_by_layer(family, config):
        for tp_rank in range(tp_size):
            state = {}
            for entry in entries:
                full = TRANSFORMS[entry.transform][0]([get_hf(k) for k in entry.hf], config)
                state[entry.ours] = SPLITS[entry.tp_split][0](full, tp_rank, tp_size, config)
                del full
            yield layer, tp_rank, state


def iter_to_hf(
    get_shard: GetShard, family: ModelFamily, config: ModelConfig, tp_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from our shards (vocabulary padding removed; tied aliases left out, as
    `save_pretrained` does: transformers re-ties them on load)."""
    config.check_tp(tp_size)
    for _, entries in layout.entries_by_layer(family, config):
        for entry in entries:
            shards = [get_shard(r, entry.ours) for r in range(tp_size)]
            full = SPLITS[entry.tp_split][1](shards, config)
            del shards
            parts = TRANSFORMS[entry.transform][1](full, config)
            del full
            for name, tensor in zip(entry.hf, parts, strict=True):
                yield name, tensor.contiguous()


def _meta(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=spec.dtype, device="meta")


def hf_specs_from_shards(
    get_spec: Callable[[int, str], TensorSpec],
    family: ModelFamily,
    config: ModelConfig,
    tp_size: int,
) -> list[TensorSpec]:
    """The HF tensors `iter_to_hf` will produce, computed on meta tensors (no data read)."""
    get = lambda r, name: _meta(get_spec(r, name))  # noqa: E731
    return [
        TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in iter_to_hf(get, family, config, tp_size)
    ]


def hf_reader(ckpt: HFCheckpoint, family: ModelFamily) -> GetHF:
    def get(name: str) -> torch.Tensor:
        if name not in ckpt:
            raise UserError(
                f"{ckpt.source}: no tensor {name}; is it a {family.hf_architecture} "
                "checkpoint matching its config.json?"
            )
        return ckpt.get(name)

    return get


def hf_to_stage_state_dicts(
    hf_dir: str | Path, tp_size: int, pp_size: int
) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """In memory: {(tp_rank, pp_rank): our state dict of that stage} (small models, tests)."""
    family, config, ckpt = read_hf_input(hf_dir)
    stage_of = {
        i: s for s, layers in enumerate(layout.stage_layers(config, pp_size)) for i in layers
    }
    get = hf_reader(ckpt, family)
    out: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for layer, tp_rank, state in iter_from_hf(get, family, config, tp_size):
        out.setdefault((tp_rank, stage_of[layer.index]), {}).update(state)
    return out


def hf_to_pipeline_checkpoint(
    hf_dir: str | Path,
    out_root: str | Path,
    tp_size: int,
    pp_size: int = 1,
    *,
    dtype: torch.dtype | None = None,
    tag: str = "iter_0000000",
) -> Path:
    """HF dir -> a weights-only trainer checkpoint at (tp_size, pp_size), ready for
    `train --reset-progress checkpoint.load=<out_root>` (see trainer_ckpt.py). Streamed: one
    (layer, tp rank) shard in memory at a time. Returns the tag directory."""
    from megatron_ext.convert.trainer_ckpt import write_checkpoint

    family, config, ckpt = read_hf_input(hf_dir)
    get = hf_reader(ckpt, family)
    shards = iter_from_hf(get, family, config, tp_size)
    return write_checkpoint(out_root, shards, config, tp_size, pp_size, dtype=dtype, tag=tag)


def model_card(
    config: ModelConfig, family: ModelFamily, source: str, run_config: dict, facts: dict
) -> str:
    rows = [
        ("architecture", family.hf_architecture),
        ("layers", config.num_layers),
        ("hidden size", config.hidden_size),
        ("attention heads", f"{config.num_attention_heads} ({config.num_kv_heads} kv)"),
        ("vocabulary", config.vocab_size),
        ("sequence length", config.seq_length),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    trained = "\n".join(f"| {k} | {v} |" for k, v in facts.items() if v is not None)
    run = dump_yaml(run_config) if run_config else "(no run config saved)\n"
    return (
        "---\nlibrary_name: transformers\ntags: [megatron-ext]\n---\n\n"
        f"# Model converted from {source}\n\nConverted by `megatron-ext convert to-hf`.\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        + (f"## Training\n\n| | |\n|---|---|\n{trained}\n\n" if trained else "")
        + "TODO (model owner): intended use, training data, evaluation, limitations.\n\n"
        f"## Training run config\n\n```yaml\n{run}```\n"
    )


def write_hf(
    out_dir: str | Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: list[TensorSpec],
    family: ModelFamily,
    config: ModelConfig,
    *,
    max_shard_size: int = 5 * 10**9,
    tokenizer_dir: str | Path | None = None,
    token_ids: dict[str, int] | None = None,
    run_config: dict | None = None,
    facts: dict | None = None,
    source: str = "megatron-ext",
) -> Path:
    """Write a HF model directory atomically (nothing under `out_dir` unless all succeeds)."""
    ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
    dtype = str(specs[0].dtype).removeprefix("torch.") if specs else "float32"
    hf_config = {"model_type": family.name, **family.to_hf_config(config), **ids}
    hf_config["torch_dtype"] = dtype
    with atomic_output_dir(out_dir) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, max_shard_size)
        for name, tensor in tensors:
            writer.write(name, tensor)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"_from_model_config": True, **ids}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer_dir is not None:
            write_tokenizer_files(tokenizer_dir, tmp, config.seq_length)
        (tmp / "README.md").write_text(
            model_card(config, family, source, run_config or {}, facts or {})
        )
    return Path(out_dir)


def _cast(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None):
    for name, tensor in tensors:
        yield name, tensor if dtype is None else tensor.to(dtype).contiguous()


def export_hf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    iteration: int | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer_dir: str | Path | None = None,
    max_shard_size: int | str = "5GB",
    token_ids: dict[str, int | None] | None = None,
) -> Path:
    """A trainer checkpoint (root: its `latest` or `iteration`; or a tag dir) at any (tp, pp)
    -> a Hugging Face model directory (BloomForCausalLM / LlamaForCausalLM) at `output`.

    dtype: "fp32" | "bf16" | "fp16" (or a torch dtype); None keeps the checkpoint's. Token ids
    (bos/eos/pad) default to the tokenizer's special tokens. Streamed; atomic. Returns `output`.
    """
    from megatron_ext.convert.trainer_ckpt import open_checkpoint

    ckpt = open_checkpoint(checkpoint, iteration)
    torch_dtype = parse_dtype(dtype)
    if tokenizer_dir is None:
        log.warning("no --tokenizer given: %s will have no tokenizer files", output)
    ids = {
        **special_token_ids(tokenizer_dir),
        **{k: v for k, v in (token_ids or {}).items() if v is not None},
    }
    family, config, tp = ckpt.family, ckpt.config, ckpt.tp_size
    reader = ckpt.reader
    shapes.check_shards(reader, family, config, tp, ckpt.tag_dir / "config.yaml")
    specs = hf_specs_from_shards(reader.spec, family, config, tp)
    if torch_dtype is not None:
        specs = [TensorSpec(s.name, torch_dtype, s.shape) for s in specs]
    tensors = _cast(iter_to_hf(reader.get, family, config, tp), torch_dtype)
    return write_hf(
        output, tensors, specs, family, config,
        max_shard_size=parse_size(max_shard_size), tokenizer_dir=tokenizer_dir, token_ids=ids,
        run_config=ckpt.run_config, facts=ckpt.facts(), source=str(ckpt.tag_dir),
    )  # fmt: skip


def pipeline_checkpoint_to_hf(ckpt: str | Path, out_dir: str | Path, **kw) -> Path:
    """Compatibility name of `export_hf` (root or tag dir -> HF model directory)."""
    return export_hf(ckpt, out_dir, **kw)
