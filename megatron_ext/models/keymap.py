"""Hugging Face key maps as data, and the two primitive conversions they drive.

A model family contributes a tuple of `KeyMapEntry`: our parameter name, the HF names it is
made from, a named transform (HF tensors <-> our full, unsplit tensor) and a named TP split
rule (full tensor <-> one TP rank's shard). "{layer}" in names stands for the block index.

    KeyMapEntry("layers.{layer}.attention.linear_qkv.weight",
                ("model.layers.{layer}.self_attn.q_proj.weight", "...k_proj.weight",
                 "...v_proj.weight"),
                transform="qkv_from_q_k_v", tp_split="qkv")

Split rules: "column" (dim 0), "row" (dim 1), "vocab" (dim 0, padded to the TP-padded
vocabulary; merging drops the padding), "qkv" and "glu" (interleaved row layouts, see
attention.py / transformer.py), None (replicated on every TP rank).
`hf_to_ours` and `merge_to_hf` are what the conversion driver composes (with pipeline stages
and checkpoint I/O on top).

A family may also describe its layout in Megatron-DeepSpeed checkpoints (`MegatronDeepSpeed`):
where each of our parameters sits in GPTModelPipe's layer files, keyed by the same names as the
key map, so that reader merges the TP shards with the same split rules and reaches HF names
through the same transforms (convert/megatron_deepspeed.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from megatron_ext.errors import UserError
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.partition import glu_partition, qkv_partition


@dataclass(frozen=True)
class KeyMapEntry:
    ours: str
    hf: tuple[str, ...]
    transform: str = "identity"
    tp_split: str | None = None
    requires: str | None = None  # a boolean config field ("!field": must be false)

    def applies(self, config: ModelConfig) -> bool:
        if self.requires is None:
            return True
        negate = self.requires.startswith("!")
        return bool(getattr(config, self.requires.lstrip("!"))) != negate

    def for_layer(self, layer: int) -> KeyMapEntry:
        fill = lambda s: s.replace("{layer}", str(layer))  # noqa: E731
        return KeyMapEntry(
            fill(self.ours), tuple(map(fill, self.hf)), self.transform, self.tp_split, None
        )


@dataclass(frozen=True)
class MegatronDeepSpeed:
    """A family's layout in Megatron-DeepSpeed's GPTModelPipe checkpoints.

    Pipeline layers, from the embedding's index E: block i at E + block_offset + i, the final
    norm `final_offset` after the last block, an untied output layer right after the norm.
    `keys`: our parameter name ("{layer}" for blocks) -> (part, key in that layer's file), part
    one of "embed", "block", "final", "head". A fused tensor's TP shards are merged by the
    key-map entry's split rule: Megatron's shards are ours ([nkv/tp, g + 2, hn] QKV rows, each
    rank's gate rows then its up rows), and so are the full tensors of universal checkpoints.
    `requires`: Megatron `args` (as the reader normalises them: position_embedding_type is
    "alibi", "rope" or "absolute") -> the value this family needs; the reader picks the family
    whose requirements the args meet and names the args that differ otherwise."""

    block_offset: int
    final_offset: int
    keys: Mapping[str, tuple[str, str]]
    requires: Mapping[str, object]
    description: str  # what `requires` says, for the refusal


@dataclass(frozen=True)
class ModelFamily:
    """What a family contributes: recipe (ModelConfig defaults), presets, HF key map."""

    name: str
    hf_architecture: str
    recipe: dict
    presets: dict[str, dict]
    key_map: tuple[KeyMapEntry, ...]
    to_hf_config: Callable[[ModelConfig], dict]
    from_hf_config: Callable[[dict], ModelConfig]
    hf_tied_keys: dict[str, str] = field(default_factory=dict)  # alias -> source when tied
    megatron_deepspeed: MegatronDeepSpeed | None = None  # its Megatron-DeepSpeed layout


# Our block modules -> Megatron-DeepSpeed's (ParallelTransformerLayerPipe, every family).
MEGATRON_BLOCK_MODULES = {
    "input_norm": "input_layernorm",
    "attention.linear_qkv": "self_attention.query_key_value",
    "attention.linear_proj": "self_attention.dense",
    "post_attention_norm": "post_attention_layernorm",
    "mlp.linear_fc1": "mlp.dense_h_to_4h",
    "mlp.linear_fc2": "mlp.dense_4h_to_h",
}


def megatron_block_keys() -> dict[str, tuple[str, str]]:
    """`MegatronDeepSpeed.keys` of the blocks (weights and biases; a family's key map says
    which of them it has)."""
    return {
        f"layers.{{layer}}.{ours}.{p}": ("block", f"{theirs}.{p}")
        for ours, theirs in MEGATRON_BLOCK_MODULES.items()
        for p in ("weight", "bias")
    }


# --- transforms: HF tensors <-> our full tensor ------------------------------------------


def _qkv_from_q_k_v(tensors: Sequence[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    q, k, v = tensors
    nkv, hn = config.num_kv_heads, config.head_dim
    g, rest = config.num_attention_heads // nkv, q.shape[1:]
    parts = [
        q.reshape(nkv, g, hn, *rest),
        k.reshape(nkv, 1, hn, *rest),
        v.reshape(nkv, 1, hn, *rest),
    ]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _q_k_v_from_qkv(full: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    nkv, hn = config.num_kv_heads, config.head_dim
    g, rest = config.num_attention_heads // nkv, full.shape[1:]
    grouped = full.reshape(nkv, g + 2, hn, *rest)
    return [grouped[:, i].reshape(-1, *rest).contiguous() for i in (slice(0, g), g, g + 1)]


TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    # name: (hf tensors -> our full tensor, our full tensor -> hf tensors)
    "identity": (lambda ts, c: ts[0], lambda t, c: [t]),
    "qkv_from_q_k_v": (_qkv_from_q_k_v, _q_k_v_from_qkv),
    "glu_from_gate_up": (lambda ts, c: torch.cat(list(ts), dim=0), lambda t, c: list(t.chunk(2))),
}


# --- TP split rules: our full tensor <-> one rank's shard --------------------------------


def _chunk(dim: int):
    def split(full, rank, size, config):
        if full.shape[dim] % size:
            raise UserError(
                f"dimension {dim} of size {full.shape[dim]} is not divisible by tp={size}"
            )
        return full.chunk(size, dim=dim)[rank].contiguous()

    return split, lambda shards, config: _cat(shards, dim)


def _cat(shards, dim: int = 0) -> torch.Tensor:
    """torch.cat, without copying a lone shard (tp=1: a whole embedding would be copied)."""
    return shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim)


def _vocab_split(full, rank, size, config):
    pad = config.padded_vocab_size(size) - full.shape[0]
    padded = torch.cat([full, full.new_zeros((pad, *full.shape[1:]))]) if pad else full
    return padded.chunk(size, dim=0)[rank].contiguous()


def _rows(partition_of: Callable[[ModelConfig], Callable]):
    def split(full, rank, size, config):
        rows = partition_of(config)(rank, size)
        return (full[rows] if isinstance(rows, slice) else full.index_select(0, rows)).contiguous()

    def merge(shards, config):
        size = len(shards)
        total = sum(s.shape[0] for s in shards)  # upper bound: replicated rows counted twice
        full = shards[0].new_empty((total, *shards[0].shape[1:]))
        seen = torch.zeros(total, dtype=torch.bool)
        for rank, shard in enumerate(shards):
            rows = partition_of(config)(rank, size)
            full[rows], seen[rows] = shard, True
        return full[: int(seen.nonzero().max()) + 1]

    return split, merge


SPLITS: dict[str | None, tuple[Callable, Callable]] = {
    None: (lambda full, rank, size, config: full, lambda shards, config: shards[0]),
    "column": _chunk(0),
    "row": _chunk(1),
    "vocab": (_vocab_split, lambda shards, config: _cat(shards)[: config.vocab_size]),
    "qkv": _rows(qkv_partition),
    "glu": _rows(lambda config: glu_partition(config.ffn_hidden_size)),
}


# --- conversions -------------------------------------------------------------------------


def expand_key_map(entries: Sequence[KeyMapEntry], config: ModelConfig) -> list[KeyMapEntry]:
    """Concrete entries for this config: "{layer}" expanded, `requires` filtered."""
    out = []
    for entry in entries:
        if not entry.applies(config):
            continue
        if "{layer}" in entry.ours:
            out.extend(entry.for_layer(i) for i in range(config.num_layers))
        else:
            out.append(entry)
    return out


def hf_to_ours(
    hf_state: Mapping[str, torch.Tensor],
    family: ModelFamily,
    config: ModelConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> dict[str, torch.Tensor]:
    """HF state dict -> our state dict for TP rank `tp_rank` of `tp_size` (all entries)."""
    out = {}
    for entry in expand_key_map(family.key_map, config):
        missing = [k for k in entry.hf if k not in hf_state]
        if missing:
            raise UserError(
                f"{family.hf_architecture} state dict lacks {missing[0]} (needed for "
                f"{entry.ours}); is the checkpoint a {family.name} model with this config?"
            )
        full = TRANSFORMS[entry.transform][0]([hf_state[k] for k in entry.hf], config)
        out[entry.ours] = SPLITS[entry.tp_split][0](full, tp_rank, tp_size, config)
    return out


def merge_to_hf(
    shards: Sequence[Mapping[str, torch.Tensor]], family: ModelFamily, config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Our state dicts of TP ranks 0..tp-1 -> one HF state dict (padding dropped)."""
    out = {}
    for entry in expand_key_map(family.key_map, config):
        full = SPLITS[entry.tp_split][1]([s[entry.ours] for s in shards], config)
        for name, tensor in zip(
            entry.hf, TRANSFORMS[entry.transform][1](full, config), strict=True
        ):
            out[name] = tensor
    if config.tied_embeddings:
        for alias, source in family.hf_tied_keys.items():
            out[alias] = out[source]
    return out


def require_fields(config: ModelConfig, architecture: str, wanted: dict) -> None:
    """Raise naming the first field of CONFIG that differs from WANTED (field -> value), the
    values a Hugging Face ARCHITECTURE can express."""
    for name, value in wanted.items():
        if getattr(config, name) != value:
            raise UserError(
                f"model config: {architecture} needs {name}={value!r}, got "
                f"{getattr(config, name)!r}; change it or use another family"
            )
