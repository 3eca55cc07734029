"""Megatron-DeepSpeed checkpoints (BigScience BLOOM, TurkuNLP FinGPT/BLUUMI, Microsoft and
LumiOpen Llama-architecture runs) and DeepSpeed universal checkpoints -> our trainer checkpoint
at any (tp, pp).

This module knows the files: discovery, safe unpickling and TP merging. What a family's
checkpoint holds is data next to its Hugging Face key map (`ModelFamily.megatron_deepspeed`,
see models/keymap.py, bloom.py, llama.py): the pipeline-layer offsets, the file key of each of
our parameters, and the Megatron args the family needs. Each parameter's TP shards are merged
by its key-map entry's split rule into our full tensor (Megatron's shards are ours: QKV rows
[nkv / tp, g + 2, hn] per rank, each rank's gate rows then its up rows), the entry's named
transform gives the HF tensors, and the one conversion driver (driver.iter_from_hf +
trainer_ckpt.write_checkpoint) does the rest, exactly as for `convert from-hf`: the same model
converts to bit-identical files from either source.

Layout 1, GPTModelPipe layer files (a DeepSpeed PipelineModule: one file per pipeline layer and
TP rank, whatever the pipeline size):

    <root>/latest                                    the tag, e.g. "global_step95000"
    <root>/<tag>/layer_XX-model_YY-model_states.pt   XX = pipeline layer, YY = tp rank
    <root>/<tag>/mp_rank_MM_model_states.pt          engine state and Megatron's client state
                                                     (`args`, iteration, rng); no weights
From the embedding's layer E: block i at E + block_offset + i, the final norm final_offset after
the last block, an untied lm_head right after the norm (BLOOM-176B, L=70, tp=4: layer_01,
layer_03..layer_72, layer_74, each for model_00..03). Indices are taken relative to the lowest
one found, so a variant without the leading function layer converts too; a gap names the
missing file, an extra layer is refused.
Replicated tensors: identical on every rank -> rank 0's. If they drifted apart (bf16 training
without TP-duplicate sync) -> their mean (computed in fp64, cast back) with a warning, as
transformers' converter averages them.
QKV order: since Megatron checkpoint_version 2.0 (BLOOM's are 3.0) the rows are grouped per
head; older versions are refused.
Vocabulary: the merged table has V_pad rows (padded to make-vocab-size-divisible-by * tp);
HF BLOOM keeps the padded table (250,880 rows), and so do we unless `--vocab-size N` keeps
the first N rows (the tokenizer's size).

Layout 2, a DeepSpeed universal checkpoint (deepspeed.checkpoint.ds_to_universal, or
BigScience's tools/convert_checkpoint/ds_to_universal.py):

    <root>/latest_universal                     the tag, e.g. "global_step95000_universal"
    <root>/<tag>/zero/<param>/fp32.pt            {"param": full fp32 tensor (TP merged), ...}
    <root>/<tag>/zero/<param>/exp_avg{,_sq}.pt   Adam moments (not read: weights only)
    <root>/<tag>/mp_rank_MM_model_states.pt      copied from the source checkpoint (args)
<param> is the PipelineModule parameter name: "tied_modules.embed.<key>" for a tied embedding,
otherwise "XX.<key>" (XX the pipeline layer as above; the highest XX is the lm_head when
untied, else the final norm). The merged tensors are our full tensors: replicated ones once,
row/column parallel ones concatenated, the SwiGLU weight as [all gate rows; all up rows]
(DeepSpeed's two-sub-parameter rule), the QKV rows concatenated over ranks, i.e. grouped per
kv head. The vocabulary is cut to the tokenizer's size (DeepSpeed) or kept padded (BigScience).
When a directory has both zero/ and layer files (ds_to_universal copies the latter), zero/
(fp32 master weights) is read.
Not readable correctly: Microsoft Megatron-DeepSpeed after commit 676a482c (December 2024)
stores each rank's QKV rows as [q; k; v] blocks instead of per head; nothing in the files says
which code wrote them, so such a checkpoint converts without error into wrong attention
weights (the converted model's loss shows it).

Model config: `--hf-config` (a BLOOM or Llama config.json) when given; otherwise Megatron's
`args` in mp_rank_00_model_states.pt. That file is a pickle of argparse.Namespace, Megatron
enums and numpy rng state: it is read with torch.load(weights_only=True) with
argparse.Namespace allowed and each megatron/deepspeed/numpy/apex global replaced by an inert
stand-in (nothing from the file is imported or called); a file naming any other global is
refused. Weight files are read with plain weights_only=True (memory-mapped): a pickle that
needs more is refused.
Memory: one parameter's TP shards and their merge at a time (plus the driver's output shard).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_ext.checkpoint_format import layer_file
from megatron_ext.convert import driver
from megatron_ext.convert.safetensors_io import load_weights_only
from megatron_ext.convert.shapes import expected_shard_shapes
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import SPLITS, TRANSFORMS, KeyMapEntry, ModelFamily
from megatron_ext.models.presets import FAMILIES

log = get_logger(__name__)

LAYER_GLOB = "layer_*-model_*-model_states.pt"
LAYER_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
STAND_IN_MODULES = ("megatron.", "deepspeed.", "numpy.", "apex.")
# megatron.enums.PositionEmbeddingType values (rotary 1, absolute 2, alibi 3), and the names of
# later versions' string-valued --position-embedding-type
POSITION_NAMES = {1: "rope", 2: "absolute", 3: "alibi", "rope": "rope", "rotary": "rope",
                  "learned_absolute": "absolute", "absolute": "absolute", "alibi": "alibi"}  # fmt: skip
# An arg a checkpoint does not record has the value of the code that did not know it yet.
ARG_DEFAULTS = {
    "swiglu": False,
    "normalization": "layernorm",
    "embed_layernorm": True,
    "glu_activation": None,
    "add_bias_linear": True,
    "add_position_embedding": False,
    "rotary_percent": 1.0,
    "apply_residual_connection_post_layernorm": False,
}
# ModelConfig field -> the Megatron arg holding it (every family)
ARG_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "ffn_hidden_size": "ffn_hidden_size",
    "layernorm_epsilon": "layernorm_epsilon",
    "init_std": "init_method_std",
    "seq_length": "seq_length",
    "rope_theta": "rope_theta",
}


# --- the source: which files hold which layer -----------------------------------------------


@dataclass(frozen=True)
class Source:
    """A Megatron-DeepSpeed tag directory, checked complete for a model config."""

    tag_dir: Path
    universal: bool
    tp_size: int  # of the files (1 for universal: merged by ds_to_universal)
    parts: dict[str, int | None]  # "embed", "final", "head" -> pipeline layer (None: tied)
    blocks: tuple[int, ...]  # pipeline layer of block i

    def index(self, part: str, layer: int | None) -> int | None:
        return self.blocks[layer] if part == "block" else self.parts[part]

    def path(self, part: str, layer: int | None, key: str, tp_rank: int = 0) -> Path:
        index = self.index(part, layer)
        if self.universal:
            name = f"tied_modules.embed.{key}" if index is None else f"{index}.{key}"
            return self.tag_dir / "zero" / name / "fp32.pt"
        return layer_file(self.tag_dir, index, tp_rank)


@dataclass(frozen=True)
class Tensor:
    """One of our parameters in the source: its key-map entry and where its shards are."""

    entry: KeyMapEntry  # concrete ("{layer}" filled)
    part: str
    layer: int | None
    key: str


def tensors_of(family: ModelFamily, config: ModelConfig) -> list[Tensor]:
    """Every parameter of `config`, located by the family's Megatron-DeepSpeed layout."""
    mds = family.megatron_deepspeed
    out = []
    for entry in family.key_map:
        if not entry.applies(config):
            continue
        if entry.ours not in mds.keys:
            raise UserError(
                f"{family.name}'s Megatron-DeepSpeed layout has no tensor for {entry.ours} (a "
                f"model config with {entry.requires or 'it'} has no Megatron-DeepSpeed form)"
            )
        part, key = mds.keys[entry.ours]
        if part == "block":
            out += [Tensor(entry.for_layer(i), part, i, key) for i in range(config.num_layers)]
        else:
            out.append(Tensor(entry, part, None, key))
    return out


def resolve_source_dir(path: str | Path) -> Path:
    """A Megatron-DeepSpeed checkpoint root (`latest`, else `latest_universal`) or a tag
    directory -> the tag directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p} is not a directory; give a Megatron-DeepSpeed checkpoint")
    for name in ("latest", "latest_universal"):
        if (p / name).is_file():
            tag = (p / name).read_text().strip()
            if not (p / tag).is_dir():
                raise UserError(f"{p / name} names {tag!r}, which does not exist under {p}")
            p = p / tag
            break
    if not (p / "zero").is_dir() and not any(p.glob(LAYER_GLOB)):
        raise UserError(
            f"{p}: no layer_XX-model_YY-model_states.pt files and no zero/ directory; give a "
            "Megatron-DeepSpeed checkpoint root (with `latest`) or its global_stepN directory"
        )
    return p


def _missing(path: Path, what: str) -> UserError:
    return UserError(f"{path} is missing ({what}); is the checkpoint complete?")


def _layout(mds, first_block: int, num_layers: int, tied: bool) -> tuple[tuple, dict]:
    blocks = tuple(range(first_block, first_block + num_layers))
    final = blocks[-1] + mds.final_offset
    return blocks, {"final": final, "head": None if tied else final + 1}


def _open_universal(tag_dir: Path, family: ModelFamily, config: ModelConfig) -> Source:
    mds, tied = family.megatron_deepspeed, config.tied_embeddings
    names = {p.parent.name for p in (tag_dir / "zero").glob("*/fp32.pt")}
    indices = sorted({int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()})
    if not indices:
        raise UserError(f"{tag_dir / 'zero'}: no <layer>.<param>/fp32.pt files")
    final = indices[-1] - (0 if tied else 1)  # the highest layer: the lm_head, else the norm
    first = final - mds.final_offset - config.num_layers + 1
    blocks, parts = _layout(mds, first, config.num_layers, tied)
    parts["embed"] = None if tied else first - mds.block_offset
    source = Source(tag_dir, True, 1, parts, blocks)
    for t in tensors_of(family, config):
        if not source.path(t.part, t.layer, t.key).is_file():
            what = f"{config.num_layers} blocks expected"
            raise _missing(source.path(t.part, t.layer, t.key), what)
    return source


def _open_layer_files(tag_dir: Path, family: ModelFamily, config: ModelConfig) -> Source:
    mds = family.megatron_deepspeed
    found: dict[int, set[int]] = {}
    for p in tag_dir.glob(LAYER_GLOB):
        if match := LAYER_RE.match(p.name):
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not found:
        raise UserError(f"{tag_dir}: no layer_XX-model_YY-model_states.pt files")
    embed = min(found)
    tp_size = max(found[embed]) + 1
    blocks, parts = _layout(mds, embed + mds.block_offset, config.num_layers,
                            config.tied_embeddings)  # fmt: skip
    parts["embed"] = embed
    source = Source(tag_dir, False, tp_size, parts, blocks)
    wanted = sorted({source.index(t.part, t.layer) for t in tensors_of(family, config)})
    for index in wanted:
        for tp_rank in range(tp_size):
            if not layer_file(tag_dir, index, tp_rank).is_file():
                what = f"pipeline layer {index}, tp rank {tp_rank} of {tp_size}"
                raise _missing(layer_file(tag_dir, index, tp_rank), what)
    extra = sorted(set(found) - set(wanted))
    if extra:
        head = "" if config.tied_embeddings else ", untied lm_head right after it"
        raise UserError(
            f"{tag_dir}: layer files {extra} beyond the {config.num_layers} blocks of the model "
            f"config (layer_XX numbers of {family.name}: embedding, blocks from XX+"
            f"{mds.block_offset}, final norm {mds.final_offset} after the last block{head})"
        )
    if not config.num_kv_heads % tp_size == 0:
        raise UserError(
            f"{tag_dir}: {tp_size} tp ranks for {config.num_kv_heads} kv heads; Megatron-DeepSpeed "
            "gives each rank whole kv heads"
        )
    return source


def open_source(tag_dir: Path, family: ModelFamily, config: ModelConfig) -> Source:
    if (tag_dir / "zero").is_dir():
        return _open_universal(tag_dir, family, config)
    return _open_layer_files(tag_dir, family, config)


# --- Megatron's args, read without running code from the file -------------------------------


class StandIn:
    """A megatron/deepspeed/numpy object of a checkpoint as data: the global it names and the
    arguments and state it was rebuilt with. Nothing is imported or called."""

    name = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name}{self.args}>"


def read_client_state(path: Path) -> dict:
    """An mp_rank_XX_model_states.pt of Megatron-DeepSpeed, weights-only (see module doc)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means: not a torch.save file
        raise UserError(f"{path}: not a readable torch.save file ({exc})") from None
    foreign = [n for n in names if n != "argparse.Namespace" and not n.startswith(STAND_IN_MODULES)]
    if foreign:
        raise UserError(
            f"{path}: refused: this pickle names {', '.join(foreign[:5])}, which only arbitrary "
            "unpickling (which can run code) would rebuild. Pass --hf-config CONFIG.json to "
            "convert without this file"
        )
    allowed = [argparse.Namespace]
    allowed += [(type(n, (StandIn,), {"name": n}), n) for n in names if n != "argparse.Namespace"]
    with torch.serialization.safe_globals(allowed):
        state = load_weights_only(path)
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of engine and client state")
    return state


def normalised_args(args: dict) -> dict:
    """Megatron's args with ARG_DEFAULTS filled in and the position embedding as a name
    ("alibi", "rope", "absolute"; BigScience's enum, Microsoft's rotary flag or a string)."""
    out = {**ARG_DEFAULTS, **{k: v for k, v in args.items() if v is not None}}
    out["glu_activation"] = args.get("glu_activation") or None
    position = args.get("position_embedding_type")  # an enum stand-in: its value in .args
    value = position.args[0] if getattr(position, "args", None) else position
    if args.get("use_rotary_position_embeddings"):
        value = "rope"
    # absent: BigScience's code always records it, so a run without it predates rotary/ALiBi
    # choices only in BigScience's fork, whose default was ALiBi
    out["position_embedding_type"] = "alibi" if value is None else POSITION_NAMES.get(value, value)
    return out


def family_from_args(args: dict, where: Path) -> ModelFamily:
    """The family whose Megatron-DeepSpeed requirements the args meet; refuses naming the args
    that differ from the closest family's."""
    norm = normalised_args(args)
    families = [f for f in FAMILIES.values() if f.megatron_deepspeed is not None]

    def differing(family: ModelFamily) -> list[str]:
        needs = family.megatron_deepspeed.requires
        return [k for k, v in needs.items() if norm.get(k) != v]

    best = min(families, key=lambda f: len(differing(f)))
    bad = differing(best)
    if bad:
        found = ", ".join(f"{k}={norm.get(k)!r} (needs {best.megatron_deepspeed.requires[k]!r})"
                          for k in bad)  # fmt: skip
        names = ", ".join(f.name for f in families)
        raise UserError(
            f"{where}: args {found}: not {best.megatron_deepspeed.description}; no key map for "
            f"it (families with a Megatron-DeepSpeed layout: {names})"
        )
    return best


def config_from_args(state: dict, where: Path) -> tuple[ModelFamily, ModelConfig]:
    """The family and model config of Megatron's client state (vocab_size: the padded table's
    rows as recorded; the caller fixes it against the files)."""
    args = vars(state["args"])
    version = state.get("checkpoint_version", 3.0)
    if isinstance(version, (int, float)) and version < 2.0:
        raise UserError(
            f"{where}: checkpoint_version {version} stores QKV rows in a pre-2.0 order; load and "
            "re-save it with Megatron first"
        )
    family = family_from_args(args, where)
    fields = {f: args[a] for f, a in ARG_FIELDS.items() if args.get(a) is not None}
    fields["vocab_size"] = args.get("padded_vocab_size") or 1
    fields["tied_embeddings"] = not args.get("untie_embeddings_and_output_weights", False)
    try:
        config = ModelConfig(**{**family.recipe, **fields})
        family.to_hf_config(config)  # the HF form exists (BLOOM: ffn = 4h, ...)
    except (UserError, TypeError, ValueError) as exc:
        raise UserError(
            f"{where}: args describe a {family.name} model we cannot hold: {exc}"
        ) from None
    kv_channels = args.get("kv_channels")
    if kv_channels not in (None, config.head_dim):
        raise UserError(
            f"{where}: args kv_channels={kv_channels!r}, but heads of hidden_size / heads = "
            f"{config.head_dim} are the only ones {family.megatron_deepspeed.description} has"
        )
    return family, config


def source_config(
    tag_dir: Path, hf_config: str | Path | None
) -> tuple[ModelFamily, ModelConfig, str]:
    """The model: from `hf_config` (a config.json) if given, else from Megatron's args; and
    where it was read, for messages."""
    if hf_config is not None:
        try:
            hf = json.loads(Path(hf_config).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--hf-config {hf_config}: not a readable JSON file ({exc})") from None
        family = driver.family_of(hf, str(hf_config))
        if family.megatron_deepspeed is None:
            raise UserError(
                f"--hf-config {hf_config}: {family.name} has no Megatron-DeepSpeed layout"
            )
        try:
            config = family.from_hf_config({**hf, "vocab_size": hf.get("vocab_size") or 1})
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(
                f"--hf-config {hf_config}: missing or invalid field ({exc!r:.200})"
            ) from None
        if hf.get("seq_length"):
            config = config.replace(seq_length=int(hf["seq_length"]))
        return family, config, str(hf_config)
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise UserError(
            f"{path} is missing, so the model's shape (heads, layers) is unknown; pass "
            "--hf-config with the model's config.json"
        )
    state = read_client_state(path)
    if not isinstance(state.get("args"), argparse.Namespace):
        raise UserError(
            f"{path}: no Megatron `args`; pass --hf-config with the model's config.json"
        )
    family, config = config_from_args(state, path)
    return family, config, str(path)


# --- tensors: TP shards -> our full tensors -> HF tensors -----------------------------------


def _load(source: Source, path: Path, key: str) -> torch.Tensor:
    state = load_weights_only(path)  # memory-mapped; refuses pickles that need more
    if source.universal:
        tensor = state.get("param") if isinstance(state, dict) else state
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path}: expected {{'param': tensor}} as ds_to_universal writes")
        return tensor
    if not isinstance(state, dict) or key not in state:
        have = ", ".join(sorted(state)[:8]) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path} has no {key} (has: {have}); is it a checkpoint of this model?")
    return state[key]


def _shards(source: Source, t: Tensor) -> tuple[list[torch.Tensor], Path]:
    """The TP shards of `t` (memory-mapped), and the first file's path."""
    paths = [source.path(t.part, t.layer, t.key, r) for r in range(source.tp_size)]
    return [_load(source, p, t.key) for p in paths], paths[0]


def _replicated(key: str, shards: list[torch.Tensor], where: Path) -> torch.Tensor:
    first = shards[0]
    if all(torch.equal(first, s) for s in shards[1:]):
        return first
    stacked = torch.stack([s.double() for s in shards])
    drift = float((stacked - stacked[0]).abs().max())
    log.warning(
        "%s: %s differs across the %d tp ranks (max |diff| %.3g): using their mean",
        where, key, len(shards), drift,
    )  # fmt: skip
    return stacked.mean(dim=0).to(first.dtype)


def vocab_rows(source: Source, family: ModelFamily, config: ModelConfig) -> int:
    """Rows of the merged word embedding (memory-mapped: no data read)."""
    embed = next(t for t in tensors_of(family, config) if t.entry.tp_split == "vocab")
    shards, _ = _shards(source, embed)
    return sum(s.shape[0] for s in shards)


class Merger:
    """Our full tensor of each parameter, merged from the source's TP shards with the split
    rule of its key-map entry; every shard and merge checked against the model config."""

    def __init__(self, source: Source, config: ModelConfig) -> None:
        self.source, self.config = source, config
        self.full_shapes = expected_shard_shapes(config, 1)
        self.shard_shapes = expected_shard_shapes(config, source.tp_size)

    def _check(self, t: Tensor, found: tuple, want: tuple, where: Path, what: str) -> None:
        if found != want:
            raise UserError(
                f"{where}: {t.key} {what} is {found}, the model config needs {want}; do the "
                "config and checkpoint match?"
            )

    def full(self, t: Tensor) -> torch.Tensor:
        name, split, config = t.entry.ours, t.entry.tp_split, self.config
        shards, where = _shards(self.source, t)
        h = config.hidden_size
        for shard in shards:  # each source shard first: a merge of misfits would fail anywhere
            if split == "vocab":
                self._check(t, tuple(shard.shape[1:]), (h,), where, "(columns)")
            elif not self.source.universal:
                self._check(t, tuple(shard.shape), self.shard_shapes[name], where, "(one rank)")
        if split is None:
            full = _replicated(t.key, shards, where)
        else:
            if split == "vocab" and sum(s.shape[0] for s in shards) < config.vocab_size:
                rows = sum(s.shape[0] for s in shards)
                raise UserError(f"{where}: {t.key} has {rows} rows, fewer than the vocabulary's "
                                f"{config.vocab_size}")  # fmt: skip
            full = SPLITS[split][1](shards, config)
        want = (config.vocab_size, h) if split == "vocab" else self.full_shapes[name]
        merged = f"merged over tp={self.source.tp_size}"
        self._check(t, tuple(full.shape), tuple(want), where, merged)
        if any(full.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in shards):
            full = full.clone()  # a private copy: the memory map closes with the file
        return full.contiguous()


def hf_reader(source: Source, family: ModelFamily, config: ModelConfig) -> driver.GetHF:
    """`get_hf(name)`: one full HF tensor: its parameter merged from the source's files, then
    cut into HF tensors by the key map's named transform. The last parameter's HF tensors are
    kept (the driver asks for the names of one parameter together)."""
    merger = Merger(source, config)
    by_hf = {name: t for t in tensors_of(family, config) for name in t.entry.hf}
    last: tuple[str, dict[str, torch.Tensor]] = ("", {})  # a parameter and its HF tensors

    def get(hf_name: str) -> torch.Tensor:
        nonlocal last
        t = by_hf.get(hf_name)
        if t is None:
            raise UserError(f"{source.tag_dir}: no Megatron-DeepSpeed tensor for {hf_name}")
        if last[0] != t.entry.ours:
            last = ("", {})  # drop the previous parameter's tensors before merging the next
            parts = TRANSFORMS[t.entry.transform][1](merger.full(t), config)
            last = (t.entry.ours, dict(zip(t.entry.hf, parts, strict=True)))
        return last[1][hf_name].contiguous()

    return get


# --- the conversion ----------------------------------------------------------------------------


def convert(
    input_dir: str | Path,
    output: str | Path,
    tp_size: int = 1,
    pp_size: int = 1,
    *,
    dtype: torch.dtype | str | None = None,
    hf_config: str | Path | None = None,
    vocab_size: int | None = None,
) -> Path:
    """A Megatron-DeepSpeed or universal checkpoint -> our weights-only trainer checkpoint
    (ready for `train --reset-progress`). Atomic: nothing under `output` unless all succeeds.
    Returns the tag directory."""
    from megatron_ext.convert.trainer_ckpt import write_checkpoint

    tag_dir = resolve_source_dir(input_dir)
    family, config, _ = source_config(tag_dir, hf_config)
    source = open_source(tag_dir, family, config)
    rows = vocab_rows(source, family, config)
    recorded = config.vocab_size if config.vocab_size > 1 else rows
    vocab = vocab_size or min(recorded, rows)
    if not 0 < vocab <= rows:
        raise UserError(f"--vocab-size {vocab}: the checkpoint's embedding has {rows} rows")
    config = config.replace(vocab_size=vocab)
    log.info(
        "%s: %s %s, tp=%d -> tp=%d pp=%d; %d layers, hidden %d, %d heads, vocabulary %d of %d rows",
        tag_dir, family.name,
        "universal checkpoint" if source.universal else "Megatron-DeepSpeed layer files",
        source.tp_size, tp_size, pp_size, config.num_layers, config.hidden_size,
        config.num_attention_heads, vocab, rows,
    )  # fmt: skip
    shards = driver.iter_from_hf(hf_reader(source, family, config), family, config, tp_size)
    return write_checkpoint(
        output, shards, config, tp_size, pp_size, dtype=driver.parse_dtype(dtype)
    )
