"""Megatron-DeepSpeed checkpoints (BigScience BLOOM, TurkuNLP FinGPT/BLUUMI) and DeepSpeed
universal checkpoints -> our trainer checkpoint at any (tp, pp).

The source tensors are translated to Hugging Face BLOOM names and full (TP-merged) tensors by
a `get_hf(name)` callable, and the one conversion driver (driver.iter_from_hf +
trainer_ckpt.write_checkpoint) does the rest, exactly as for `convert from-hf`: the same
model converts to bit-identical files from either source.

Layout 1, Megatron-DeepSpeed's GPTModelPipe (a DeepSpeed PipelineModule: one file per
pipeline layer and TP rank, whatever the pipeline size):

    <root>/latest                                    the tag, e.g. "global_step95000"
    <root>/<tag>/layer_XX-model_YY-model_states.pt   XX = pipeline layer, YY = tp rank
    <root>/<tag>/mp_rank_MM_model_states.pt          engine state and Megatron's client state
                                                     (`args`, iteration, rng); no weights
Pipeline layers (GPTModelPipe.specs; L blocks, h hidden, f = 4h, np heads, hn = h / np):
    0        _to_float16 (a function: no file)
    1        EmbeddingPipe, tied "embed": word_embeddings.weight [V_pad / tp, h] (vocabulary
             rows split), word_embeddings.norm.{weight,bias} [h] (embed LayerNorm, replicated)
    2        transpose (no file)
    3..L+2   ParallelTransformerLayerPipe, block i = XX - 3:
               input_layernorm.{weight,bias} [h]                           replicated
               self_attention.query_key_value.weight [3h / tp, h], .bias   column parallel
               self_attention.dense.weight [h, h / tp] row parallel; .bias [h] replicated
               post_attention_layernorm.{weight,bias} [h]                  replicated
               mlp.dense_h_to_4h.weight [f / tp, h], .bias [f / tp]        column parallel
               mlp.dense_4h_to_h.weight [h, f / tp] row parallel; .bias [h] replicated
    L+3      transpose back (no file)
    L+4      final LayerNorm: weight, bias [h]
    L+5      the tied embedding computing the logits (a tied re-use: no file)
BLOOM-176B (L=70, tp=4) thus has layer_01, layer_03..layer_72, layer_74, each for model_00..03.
The indices are taken relative to the lowest one found, so a variant without the leading
function layer converts too; any gap names the missing file.

QKV order: since Megatron checkpoint_version 2.0 (BLOOM's are 3.0) the fused rows of each rank
are [np / tp, 3, hn] (per head: q, k, v), the order HF BloomForCausalLM splits [np, 3, hn] in;
column parallelism gives each rank a contiguous block of heads, so the merge is a concatenation
of rows (as transformers' convert_bloom_original_checkpoint_to_pytorch.py does). Older
checkpoint versions ordered the rows differently and are refused.
Replicated tensors: identical on every rank -> rank 0's. If they drifted apart (bf16 training
without TP-duplicate sync) -> their mean (computed in fp64, cast back) with a warning, as
transformers' converter averages them.
Vocabulary: the merged table has V_pad rows (padded to make-vocab-size-divisible-by * tp);
HF BLOOM keeps the padded table (250,880 rows), and so do we unless `--vocab-size N` keeps
the first N rows (the tokenizer's size).

Llama-architecture models (Microsoft/LumiOpen Megatron-DeepSpeed trained with --swiglu
--normalization rmsnorm --use-rotary-position-embeddings --untie-embeddings-and-output-weights
--disable-bias-linear [--num-key-value-heads N]; nkv kv heads, g = np / nkv) use the same layer
files with another GPTModelPipe layout (no transpose layers, no embedding norm, no biases):
    1        EmbeddingPipe: word_embeddings.weight [V_pad / tp, h]
    2..L+1   blocks, i = XX - 2: input_layernorm.weight [h], post_attention_layernorm.weight [h],
             self_attention.query_key_value.weight [(np + 2 nkv) hn / tp, h] column parallel,
             rows [nkv / tp, g + 2, hn]: per kv group its g query heads, then k, then v (MHA:
             per head q, k, v); self_attention.dense.weight [h, h / tp] row parallel;
             mlp.dense_h_to_4h.weight [2 f / tp, h]: this rank's gate rows, then its up rows
             (SwiGLU = silu(first half) * second half); mlp.dense_4h_to_h.weight [h, f / tp]
    L+2      final RMSNorm: weight [h]
    L+3      lm_head.weight [V_pad / tp, h] (untied output layer; with tied embeddings there is
             no file: the embedding is re-used as for BLOOM)
RoPE acts on the rows in HF's rotate-half order, so q and k rows map to HF's without a
permutation. (Older Microsoft versions tied the embedding and put a transpose layer before the
blocks, as BLOOM's layout does; such files fail the layer-number check with a clear error.)
Llama from a universal checkpoint is refused (its fused GLU and GQA rows are merged by rules
this reader does not know).

Layout 2, a DeepSpeed universal checkpoint (deepspeed.checkpoint.ds_to_universal):

    <root>/latest_universal                     the tag, e.g. "global_step95000_universal"
    <root>/<tag>/zero/<param>/fp32.pt            {"param": full fp32 tensor (TP merged), ...}
    <root>/<tag>/zero/<param>/exp_avg{,_sq}.pt   Adam moments (not read: weights only)
    <root>/<tag>/mp_rank_MM_model_states.pt      copied from the source checkpoint (args)
<param> is the PipelineModule parameter name: "tied_modules.embed.word_embeddings.weight",
"tied_modules.embed.word_embeddings.norm.{weight,bias}", "XX.<block key>" for the blocks and
"XX.weight", "XX.bias" for the final LayerNorm (XX the pipeline layer index as above). The
vocabulary tensor is already cut to the original vocabulary size. When a directory has both
zero/ and layer files (ds_to_universal copies the latter), zero/ (fp32 master weights) is read.

Model config: `--hf-config` (a BLOOM config.json) when given; otherwise Megatron's `args` in
mp_rank_00_model_states.pt. That file is a pickle of argparse.Namespace, Megatron enums and
numpy rng state: it is read with torch.load(weights_only=True) with argparse.Namespace allowed
and each megatron/deepspeed/numpy/apex global replaced by an inert stand-in (nothing from the
file is imported or called); a file naming any other global is refused. Weight files are read
with plain weights_only=True (memory-mapped): a pickle that needs more is refused.
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
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig

log = get_logger(__name__)

LAYER_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
EMBED_KEYS = ("word_embeddings.weight", "word_embeddings.norm.weight", "word_embeddings.norm.bias")
BLOCK_KEYS = tuple(
    f"{module}.{p}"
    for module in (
        "input_layernorm", "self_attention.query_key_value", "self_attention.dense",
        "post_attention_layernorm", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
    )
    for p in ("weight", "bias")
)  # fmt: skip
FINAL_KEYS = ("weight", "bias")
COLUMN_PARALLEL = (
    "self_attention.query_key_value.",
    "mlp.dense_h_to_4h.",
    "word_embeddings.weight",
    "lm_head.weight",
)
ROW_PARALLEL = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
# HF Llama module -> the Megatron-DeepSpeed block key holding it (q/k/v and gate/up are fused)
LLAMA_BLOCK_KEYS = {
    "input_layernorm": "input_layernorm.weight",
    "post_attention_layernorm": "post_attention_layernorm.weight",
    "self_attn.q_proj": "self_attention.query_key_value.weight",
    "self_attn.k_proj": "self_attention.query_key_value.weight",
    "self_attn.v_proj": "self_attention.query_key_value.weight",
    "self_attn.o_proj": "self_attention.dense.weight",
    "mlp.gate_proj": "mlp.dense_h_to_4h.weight",
    "mlp.up_proj": "mlp.dense_h_to_4h.weight",
    "mlp.down_proj": "mlp.dense_4h_to_h.weight",
}
STAND_IN_MODULES = ("megatron.", "deepspeed.", "numpy.", "apex.")
VOCAB_KEYS = ("word_embeddings.weight", "lm_head.weight")
LLAMA_FUSED = ("self_attention.query_key_value.weight", "mlp.dense_h_to_4h.weight")
ROTARY, ALIBI = 1, 3  # megatron.enums.PositionEmbeddingType: rotary 1, absolute 2, alibi 3


# --- the source: which files hold which layer -----------------------------------------------


@dataclass(frozen=True)
class Source:
    """A Megatron-DeepSpeed tag directory, checked complete for `num_layers` blocks."""

    tag_dir: Path
    universal: bool
    tp_size: int  # of the files (1 for universal: merged by ds_to_universal)
    embed: int | None  # pipeline index of the embedding (None in universal: tied_modules)
    blocks: tuple[int, ...]  # pipeline index of block i
    final: int
    family: str = "bloom"  # bloom | llama (key names and the GPTModelPipe layout above)
    head: int | None = None  # pipeline index of Llama's untied lm_head

    def path(self, index: int | None, key: str, tp_rank: int = 0) -> Path:
        if self.universal:
            name = f"tied_modules.embed.{key}" if index is None else f"{index}.{key}"
            return self.tag_dir / "zero" / name / "fp32.pt"
        return layer_file(self.tag_dir, index, tp_rank)

    def locate(self, hf_name: str) -> tuple[int | None, str]:
        """HF BLOOM or Llama name -> (pipeline index, key in that layer). A Llama q/k/v or
        gate/up name locates the fused tensor it is cut from."""
        if self.family == "llama":
            return self._locate_llama(hf_name)
        name = hf_name.removeprefix("transformer.")
        if name == "word_embeddings.weight":
            return self.embed, name
        if name.startswith("word_embeddings_layernorm."):
            return self.embed, "word_embeddings.norm." + name.rsplit(".", 1)[1]
        if name.startswith("ln_f."):
            return self.final, name[len("ln_f.") :]
        match = re.match(r"h\.(\d+)\.(.+)$", name)
        if match is None:
            raise UserError(f"{self.tag_dir}: no Megatron-DeepSpeed tensor for {hf_name}")
        return self.blocks[int(match.group(1))], match.group(2)

    def _locate_llama(self, hf_name: str) -> tuple[int | None, str]:
        if hf_name == "model.embed_tokens.weight":
            return self.embed, "word_embeddings.weight"
        if hf_name == "model.norm.weight":
            return self.final, "weight"
        if hf_name == "lm_head.weight" and self.head is not None:
            return self.head, "lm_head.weight"
        match = re.match(r"model\.layers\.(\d+)\.(.+)$", hf_name)
        if match is None:
            raise UserError(f"{self.tag_dir}: no Megatron-DeepSpeed tensor for {hf_name}")
        module = match.group(2).rsplit(".", 1)[0]
        key = LLAMA_BLOCK_KEYS.get(module)
        if key is None:
            raise UserError(f"{self.tag_dir}: no Megatron-DeepSpeed tensor for {hf_name}")
        return self.blocks[int(match.group(1))], key


def resolve_tag_dir(path: str | Path) -> Path:
    """A checkpoint root (`latest`, else `latest_universal`) or a tag directory."""
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
    if not (p / "zero").is_dir() and not any(p.glob("layer_*-model_*-model_states.pt")):
        raise UserError(
            f"{p}: no layer_XX-model_YY-model_states.pt files and no zero/ directory; give a "
            "Megatron-DeepSpeed checkpoint root (with `latest`) or its global_stepN directory"
        )
    return p


def _missing(path: Path, what: str) -> UserError:
    return UserError(f"{path} is missing ({what}); is the checkpoint complete?")


def _open_universal(tag_dir: Path, num_layers: int) -> Source:
    names = {p.parent.name for p in (tag_dir / "zero").glob("*/fp32.pt")}
    indices = sorted({int(n.split(".")[0]) for n in names if n.split(".")[0].isdigit()})
    if not indices:
        raise UserError(f"{tag_dir / 'zero'}: no <layer>.<param>/fp32.pt files")
    final = indices[-1]  # the final norm is the last layer; the blocks end 2 before it
    blocks = tuple(range(final - 1 - num_layers, final - 1))
    source = Source(tag_dir, True, 1, None, blocks, final)
    wanted = [(None, k) for k in EMBED_KEYS] + [(source.final, k) for k in FINAL_KEYS]
    wanted += [(i, k) for i in blocks for k in BLOCK_KEYS]
    for index, key in wanted:
        if not source.path(index, key).is_file():
            raise _missing(source.path(index, key), f"{num_layers} blocks expected")
    return source


def _open_layer_files(tag_dir: Path, num_layers: int, family: str, tied: bool) -> Source:
    found: dict[int, set[int]] = {}
    for p in tag_dir.glob("layer_*-model_*-model_states.pt"):
        if match := LAYER_RE.match(p.name):
            found.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not found:
        raise UserError(f"{tag_dir}: no layer_XX-model_YY-model_states.pt files")
    embed = min(found)
    tp_size = max(found[embed]) + 1
    if family == "llama":  # no transpose layers: blocks right after the embedding
        blocks = tuple(range(embed + 1, embed + 1 + num_layers))
        final = embed + num_layers + 1
        head = None if tied else final + 1
        source = Source(tag_dir, False, tp_size, embed, blocks, final, "llama", head)
    else:
        blocks = tuple(range(embed + 2, embed + 2 + num_layers))
        source = Source(tag_dir, False, tp_size, embed, blocks, embed + num_layers + 3)
    wanted = (embed, *blocks, source.final) + (() if source.head is None else (source.head,))
    for index in wanted:
        for tp_rank in range(tp_size):
            if not source.path(index, "", tp_rank).is_file():
                what = f"pipeline layer {index}, tp rank {tp_rank} of {tp_size}"
                raise _missing(source.path(index, "", tp_rank), what)
    extra = sorted(set(found) - set(wanted))
    if extra:
        order = (
            "embedding, blocks from XX+1, final norm, untied lm_head"
            if family == "llama"
            else "embedding, blocks from XX+2, final norm after a gap"
        )
        raise UserError(
            f"{tag_dir}: layer files {extra} beyond the {num_layers} blocks of the model config "
            f"(layer_XX numbers: {order})"
        )
    return source


def open_source(tag_dir: Path, num_layers: int, family: str = "bloom", tied: bool = True) -> Source:
    if (tag_dir / "zero").is_dir():
        if family != "bloom":
            raise UserError(
                f"{tag_dir / 'zero'}: a universal checkpoint of a Llama-architecture model is not "
                "supported (its fused GLU and GQA rows are merged by rules this reader does not "
                "know); convert the layer_XX-model_YY files it was made from instead"
            )
        return _open_universal(tag_dir, num_layers)
    return _open_layer_files(tag_dir, num_layers, family, tied)


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


def _refuse_unless(problems: dict[str, bool], args: dict, where: Path, expected: str) -> None:
    """Raise naming every arg in `problems` flagged True (with its value) and what `expected`."""
    bad = [f"{k}={args.get(k)!r}" for k, v in problems.items() if v]
    if bad:
        raise UserError(f"{where}: args {', '.join(bad)}: {expected}; no key map for it")


def _is_llama_args(args: dict) -> bool:
    return bool(args.get("swiglu")) or args.get("normalization") == "rmsnorm"


def _llama_config_from_args(args: dict, where: Path) -> dict:
    """A LlamaConfig dict from Megatron-DeepSpeed's args; refuses what LlamaForCausalLM cannot
    express (the model must be Llama in every part, not only in some)."""
    position = args.get("position_embedding_type")  # an enum stand-in, value in .args
    rotary = bool(args.get("use_rotary_position_embeddings")) or (
        getattr(position, "args", (None,))[:1] == (ROTARY,)
    )
    problems = {
        "swiglu": not args.get("swiglu"),
        "normalization": args.get("normalization") != "rmsnorm",
        "use_rotary_position_embeddings": not rotary,
        "add_bias_linear": bool(args.get("add_bias_linear", False)),
        "add_position_embedding": bool(args.get("add_position_embedding", False)),
        "rotary_percent": args.get("rotary_percent", 1.0) != 1.0,
        "kv_channels": args.get("kv_channels")
        not in (None, args["hidden_size"] // args["num_attention_heads"]),
        "apply_residual_connection_post_layernorm": bool(
            args.get("apply_residual_connection_post_layernorm")
        ),
    }
    _refuse_unless(
        problems, args, where,
        "not a Llama-architecture model (SwiGLU, RMSNorm, rotary positions on whole heads of "
        "hidden / heads, no learned positions, no linear biases, pre-norm residual)",
    )  # fmt: skip
    heads = args["num_attention_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": args["num_layers"],
        "hidden_size": args["hidden_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": args.get("num_key_value_heads") or heads,
        "intermediate_size": args["ffn_hidden_size"],
        "vocab_size": args.get("padded_vocab_size"),
        "rms_norm_eps": args.get("layernorm_epsilon", 1e-5),
        "rope_theta": float(args.get("rope_theta") or 10000.0),
        "max_position_embeddings": args.get("max_position_embeddings") or args.get("seq_length"),
        "tie_word_embeddings": not args.get("untie_embeddings_and_output_weights", False),
        "initializer_range": args.get("init_method_std", 0.02),
        "hidden_act": "silu",
        "seq_length": args.get("seq_length"),
    }


def _hf_config_from_args(args: dict, state: dict, where: Path) -> dict:
    """A BloomConfig or LlamaConfig dict from Megatron's args; refuses what neither
    BloomForCausalLM nor LlamaForCausalLM can express."""
    version = state.get("checkpoint_version", 3.0)
    if isinstance(version, (int, float)) and version < 2.0:
        raise UserError(
            f"{where}: checkpoint_version {version} stores QKV rows in a pre-2.0 order; load and "
            "re-save it with Megatron first"
        )
    if _is_llama_args(args):
        return _llama_config_from_args(args, where)
    position = args.get("position_embedding_type")
    problems = {
        "position_embedding_type": getattr(position, "args", (ALIBI,))[:1] != (ALIBI,),
        "embed_layernorm": args.get("embed_layernorm") is False,
        "glu_activation": bool(args.get("glu_activation")),
        "apply_residual_connection_post_layernorm": bool(
            args.get("apply_residual_connection_post_layernorm")
        ),
    }
    _refuse_unless(
        problems, args, where,
        "not a BLOOM-architecture model (ALiBi, embedding LayerNorm, GeLU, pre-LN residual) nor "
        "a Llama one (--swiglu, rmsnorm)",
    )  # fmt: skip
    hidden = args["hidden_size"]
    ffn = args.get("ffn_hidden_size") or 4 * hidden
    if ffn != 4 * hidden:
        raise UserError(
            f"{where}: args ffn_hidden_size={ffn}, BLOOM needs 4 * hidden = {4 * hidden}"
        )
    return {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "n_layer": args["num_layers"],
        "hidden_size": hidden,
        "n_head": args["num_attention_heads"],
        "vocab_size": args.get("padded_vocab_size"),
        "layer_norm_epsilon": args.get("layernorm_epsilon", 1e-5),
        "initializer_range": args.get("init_method_std", 0.02),
        "seq_length": args.get("seq_length"),
    }


def source_hf_config(tag_dir: Path, hf_config: str | Path | None) -> dict:
    """The model as a BloomConfig dict: from `hf_config` if given, else from Megatron's args."""
    if hf_config is not None:
        try:
            return json.loads(Path(hf_config).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--hf-config {hf_config}: not a readable JSON file ({exc})") from None
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise UserError(
            f"{path} is missing, so the model's shape (heads, layers) is unknown; pass "
            "--hf-config with a BLOOM config.json"
        )
    state = read_client_state(path)
    args = state.get("args")
    if not isinstance(args, argparse.Namespace):
        raise UserError(f"{path}: no Megatron `args`; pass --hf-config with a BLOOM config.json")
    return _hf_config_from_args(vars(args), state, path)


# --- tensors: TP shards -> full HF tensors ---------------------------------------------------


def _merge(key: str, shards: list[torch.Tensor], where: Path) -> torch.Tensor:
    if len(shards) == 1:
        return shards[0].clone()  # a private copy: the memory map closes with the file
    if key.startswith(COLUMN_PARALLEL):
        return torch.cat(shards, dim=0)
    if key in ROW_PARALLEL:
        return torch.cat(shards, dim=1)
    first = shards[0]
    if all(torch.equal(first, s) for s in shards[1:]):
        return first.clone()
    stacked = torch.stack([s.double() for s in shards])
    drift = float((stacked - stacked[0]).abs().max())
    log.warning(
        "%s: %s differs across the %d tp ranks (max |diff| %.3g): using their mean",
        where, key, len(shards), drift,
    )  # fmt: skip
    return stacked.mean(dim=0).to(first.dtype)


def _expected_shape(key: str, config: ModelConfig) -> tuple[int, ...]:
    h, f = config.hidden_size, config.ffn_hidden_size
    if config.family == "llama":
        qkv = (config.num_attention_heads + 2 * config.num_kv_heads) * config.head_dim
        llama = {
            "self_attention.query_key_value.weight": (qkv, h),
            "self_attention.dense.weight": (h, config.num_attention_heads * config.head_dim),
            "mlp.dense_h_to_4h.weight": (2 * f, h),
            "mlp.dense_4h_to_h.weight": (h, f),
        }
        return llama.get(key, (h,))
    shapes = {
        "self_attention.query_key_value.weight": (3 * h, h),
        "self_attention.query_key_value.bias": (3 * h,),
        "self_attention.dense.weight": (h, h),
        "mlp.dense_h_to_4h.weight": (f, h),
        "mlp.dense_h_to_4h.bias": (f,),
        "mlp.dense_4h_to_h.weight": (h, f),
    }
    return shapes.get(key, (h,))


def _load(source: Source, path: Path, key: str) -> torch.Tensor:
    state = load_weights_only(path)  # memory-mapped; refuses pickles that need more
    if source.universal:
        tensor = state.get("param") if isinstance(state, dict) else state
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"{path}: expected {{'param': tensor}} as ds_to_universal writes")
        return tensor
    if not isinstance(state, dict) or key not in state:
        have = ", ".join(sorted(state)[:8]) if isinstance(state, dict) else type(state).__name__
        raise UserError(
            f"{path} has no {key} (has: {have}); is it a {source.family.upper()} checkpoint?"
        )
    return state[key]


def _shards(source: Source, index: int | None, key: str) -> tuple[list[torch.Tensor], Path]:
    """The TP shards of `key` in pipeline layer `index` (memory-mapped), and the first path."""
    paths = [source.path(index, key, r) for r in range(source.tp_size)]
    return [_load(source, p, key) for p in paths], paths[0]


def vocab_rows(source: Source) -> int:
    """Rows of the merged word embedding (memory-mapped: no data read)."""
    shards, _ = _shards(source, source.embed, "word_embeddings.weight")  # both families' name
    return sum(s.shape[0] for s in shards)


def _unfuse_llama(hf_name: str, key: str, full: torch.Tensor, config, tp: int) -> torch.Tensor:
    """A Llama q/k/v or gate/up tensor out of Megatron's fused rows, merged over `tp` source
    ranks (layout in the module doc)."""
    module = hf_name.rsplit(".", 2)[-2]
    if key == "mlp.dense_h_to_4h.weight":  # each rank: its gate rows, then its up rows
        half = 0 if module == "gate_proj" else 1
        return full.reshape(tp, 2, -1, full.shape[-1])[:, half].reshape(-1, full.shape[-1])
    nkv, hn = config.num_kv_heads, config.head_dim
    g = config.num_attention_heads // nkv
    grouped = full.reshape(nkv, g + 2, hn, -1)  # ranks hold whole kv groups, in order
    rows = {"q_proj": slice(0, g), "k_proj": slice(g, g + 1), "v_proj": slice(g + 1, g + 2)}
    return grouped[:, rows[module]].reshape(-1, full.shape[-1]).contiguous()


def hf_reader(source: Source, config: ModelConfig) -> driver.GetHF:
    """`get_hf(name)`: one full HF BLOOM or Llama tensor, merged from the source's files on
    demand. A Llama q/k/v or gate/up is cut from its fused tensor, which is merged once and
    kept until a name from another tensor is asked for (the driver asks for them together)."""
    fused: dict[tuple[int | None, str], torch.Tensor] = {}  # at most one entry

    def merged(hf_name: str) -> tuple[str, torch.Tensor]:
        index, key = source.locate(hf_name)
        if (index, key) in fused:
            return key, fused[(index, key)]
        shards, where = _shards(source, index, key)
        full = _merge(key, shards, where)
        del shards
        if key in VOCAB_KEYS:
            full = full[: config.vocab_size].contiguous()  # drop the vocabulary padding
            expected: tuple[int, ...] = (config.vocab_size, config.hidden_size)
        else:
            expected = _expected_shape(key, config)
        if tuple(full.shape) != expected:
            raise UserError(
                f"{where}: {key} merged over tp={source.tp_size} is {tuple(full.shape)}, the "
                f"model config needs {expected}; do the config and checkpoint match?"
            )
        fused.clear()
        if source.family == "llama" and key in LLAMA_FUSED:
            fused[(index, key)] = full
        return key, full

    def get(hf_name: str) -> torch.Tensor:
        key, full = merged(hf_name)
        if source.family == "llama" and key in LLAMA_FUSED:
            return _unfuse_llama(hf_name, key, full, config, source.tp_size).contiguous()
        return full

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

    tag_dir = resolve_tag_dir(input_dir)
    hf = source_hf_config(tag_dir, hf_config)
    where = str(hf_config or tag_dir / "mp_rank_00_model_states.pt")
    family = driver.family_of(hf, where)
    num_layers = hf.get("n_layer", hf.get("num_hidden_layers"))
    tied = bool(hf.get("tie_word_embeddings", family.name == "bloom"))
    source = open_source(tag_dir, int(num_layers), family.name, tied)
    rows = vocab_rows(source)
    vocab = vocab_size or min(hf.get("vocab_size") or rows, rows)
    if not 0 < vocab <= rows:
        raise UserError(f"--vocab-size {vocab}: the checkpoint's embedding has {rows} rows")
    config = family.from_hf_config({**hf, "vocab_size": vocab})
    if hf.get("seq_length"):
        config = config.replace(seq_length=int(hf["seq_length"]))
    log.info(
        "%s: %s, tp=%d -> tp=%d pp=%d; %d layers, hidden %d, %d heads, vocabulary %d of %d rows",
        tag_dir, "universal checkpoint" if source.universal else "Megatron-DeepSpeed layer files",
        source.tp_size, tp_size, pp_size, config.num_layers, config.hidden_size,
        config.num_attention_heads, vocab, rows,
    )  # fmt: skip
    shards = driver.iter_from_hf(hf_reader(source, config), family, config, tp_size)
    return write_checkpoint(
        output, shards, config, tp_size, pp_size, dtype=driver.parse_dtype(dtype)
    )
