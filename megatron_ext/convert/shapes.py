"""The tensor shapes a model config implies, and the checks that a conversion's input has them.

A config.json or config.yaml that disagrees with its weights (an edited hidden_size, the
weights of another model) would otherwise be converted into an output whose config lies about
its tensors. Both directions check every tensor's shape against the config before anything is
written, on shapes alone (headers, meta tensors: no weights read).

    expected_hf_shapes(family, config)        -> {HF name: shape} (tied aliases left out)
    expected_shard_shapes(config, tp_size)    -> {our name: shape on one TP rank}
    check_hf_tensors(ckpt, family, config, where)               HF dir vs its config.json
    check_shards(reader, family, config, tp_size, where)        our shards vs config.yaml
"""

from __future__ import annotations

from pathlib import Path

from megatron_ext.convert import layout
from megatron_ext.convert.safetensors_io import HFCheckpoint
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.keymap import SPLITS, TRANSFORMS, ModelFamily, expand_key_map
from megatron_ext.models.model import build_model
from megatron_ext.models.partition import qkv_local_shape

log = get_logger(__name__)
Shape = tuple[int, ...]


def describe(config: ModelConfig) -> str:
    """The config fields that decide the shapes, for error messages."""
    return (
        f"hidden_size {config.hidden_size}, {config.num_attention_heads} heads "
        f"({config.num_kv_heads} kv), ffn_hidden_size {config.ffn_hidden_size}, "
        f"{config.num_layers} layers, vocab_size {config.vocab_size}"
    )


def expected_hf_shapes(family: ModelFamily, config: ModelConfig) -> dict[str, Shape]:
    """HF tensor shapes of `config`: our model's parameters (meta, tp=1) through the key map."""
    params = dict(build_model(config, device="meta").named_parameters())
    out = {}
    for entry in expand_key_map(family.key_map, config):
        full = SPLITS[entry.tp_split][1]([params[entry.ours]], config)
        parts = TRANSFORMS[entry.transform][1](full, config)
        out.update({name: tuple(t.shape) for name, t in zip(entry.hf, parts, strict=True)})
    return out


def expected_shard_shapes(config: ModelConfig, tp_size: int) -> dict[str, Shape]:
    """Our parameters' shapes on one TP rank, from the layers' TP attributes (not the key map)."""
    nkv_l, g_l = qkv_local_shape(config, tp_size)  # kv heads may be replicated over ranks
    out = {}
    for name, p in build_model(config, device="meta").named_parameters():
        shape = list(p.shape)
        if getattr(p, "tensor_parallel", False):
            d = p.partition_dim
            if name.endswith(("word_embeddings.weight", "output_layer.weight")):
                shape[d] = config.padded_vocab_size(tp_size) // tp_size
            elif "linear_qkv" in name:
                shape[d] = nkv_l * (g_l + 2) * config.head_dim
            else:
                shape[d] //= tp_size
        out[name] = tuple(shape)
    return out


def _mismatch(file: Path | str, name: str, found: Shape, want: Shape, where, config) -> UserError:
    return UserError(
        f"{file}: tensor {name} has shape {list(found)}, but {where} implies {list(want)} "
        f"({describe(config)}); the config does not describe these weights: give the config "
        "saved with them"
    )


def _check_extra(ckpt: HFCheckpoint, family: ModelFamily, config: ModelConfig, where) -> None:
    """Tensors the config does not read: those of a further layer are an error (the config
    has too few layers); others (buffers, tied aliases) are only reported."""
    n = config.num_layers
    known = {k for e in expand_key_map(family.key_map, config) for k in e.hf}
    deeper = expand_key_map(family.key_map, config.replace(num_layers=n + 1))
    further = {k for e in deeper for k in e.hf} - known
    for name in ckpt.keys():
        if name in further:
            raise UserError(
                f"{ckpt.file_of[name]}: tensor {name} belongs to a block past the {n} layers "
                f"that {where} gives; the config does not describe these weights"
            )
    extra = [k for k in ckpt.keys() if k not in known and k not in family.hf_tied_keys]
    if extra:
        log.warning("%s: %d tensors not converted, e.g. %s", ckpt.source, len(extra), extra[0])


def check_hf_tensors(
    ckpt: HFCheckpoint, family: ModelFamily, config: ModelConfig, where: str | Path
) -> None:
    """Raise UserError (naming the weights file, the tensor and both shapes) unless every
    tensor `config` needs is there with the shape it implies. `where`: the config's file."""
    specs = ckpt.specs()  # every header checked, every index entry found in its file
    for name, want in expected_hf_shapes(family, config).items():
        if name not in specs:
            raise UserError(
                f"{ckpt.source}: no tensor {name}, which {where} ({family.hf_architecture}, "
                f"{describe(config)}) needs; the weights and the config are not one model"
            )
        if specs[name].shape != want:
            raise _mismatch(ckpt.file_of[name], name, specs[name].shape, want, where, config)
    _check_extra(ckpt, family, config, where)


def check_shards(
    reader: layout.PipelineCheckpointReader,
    family: ModelFamily,
    config: ModelConfig,
    tp_size: int,
    where: str | Path,
) -> None:
    """Raise UserError (naming the layer file, the tensor and both shapes) unless every shard
    has the shape `config` implies at `tp_size`. Shapes only: each file's data is not read."""
    want = expected_shard_shapes(config, tp_size)
    by_layer: dict[int, list[str]] = {}
    for entry in expand_key_map(family.key_map, config):
        by_layer.setdefault(layout.layer_of(entry.ours, config).index, []).append(entry.ours)
    for names in by_layer.values():
        for tp_rank in range(tp_size):  # one file at a time: the reader keeps one file's specs
            for name in names:
                found = reader.spec(tp_rank, name).shape
                if found != want[name]:
                    layer = layout.layer_of(name, config)
                    path = layout.layer_file(reader.tag_dir, layer.index, tp_rank)
                    key = name[len(layer.prefix) :]
                    raise _mismatch(path, key, found, want[name], where, config)
