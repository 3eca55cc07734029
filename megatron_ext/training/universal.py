"""Layout change: resume a checkpoint saved at another pipeline or data-parallel size through
DeepSpeed's universal checkpoint (model, ZeRO-1 optimizer state and schedule all carried over).

The conversion itself is an offline step (convert/to_universal.py, `convert reshard
--with-optimizer --universal`); `train` refuses a layout change until it is done, naming the
command. Traps handled (regression test: tests/training/test_layout_change.py):
- `ds_to_universal` needs `universal_checkpoint_info` in the saved client_state: every
  checkpoint carries it (`universal_info`), with the TP patterns of our parameter names;
- it does not write `latest_universal`: the conversion writes it.
TP size changes: the fused QKV rows are grouped per kv head ([nkv, g + 2, hn]), so TP shards
concatenate to the full weight when both TP sizes divide the kv heads (otherwise refused with a
clear error); the SwiGLU fc1 shards are [gate_r; up_r] (DeepSpeed's 2-sub-params pattern);
vocabulary rows are unpadded on merge and re-padded with zeros for the new TP size (the padded
vocabulary is a multiple of make_vocab_size_divisible_by x tp, so it can change with tp); zeros
are what our init gives padding rows and what they keep, since their logits are masked out of
the loss (weights and Adam moments alike; test_tp_change_with_other_vocab_padding).
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_ext import checkpoint_format
from megatron_ext.checkpoint_format import universal_info  # noqa: F401 - universal.X
from megatron_ext.errors import UserError
from megatron_ext.log import get_logger
from megatron_ext.training import checkpointing

log = get_logger(__name__)

SUFFIX = checkpoint_format.UNIVERSAL_SUFFIX


def _saved(root: str):
    """(tag, saved RunConfig, dp) of the checkpoint a resume from `root` would try first."""
    from megatron_ext.training.config import saved_run_config

    for tag in checkpointing.candidates(Path(root)):
        if checkpointing.verify(Path(root) / tag) is None:
            cfg = saved_run_config(Path(root) / tag / "config.yaml")
            ranks = sum(1 for _ in (Path(root) / tag).glob("rng_rank*.pt"))
            return tag, cfg, ranks // (cfg.parallel.tp * cfg.parallel.pp)
    return None


def saved_layout(root: str) -> tuple[str, dict] | None:
    """(tag, {"tp", "pp", "dp"}) of the checkpoint a resume from `root` would try first."""
    found = _saved(root)
    if found is None:
        return None
    tag, cfg, dp = found
    return tag, {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp}


def needs_universal(root: str, tp: int, pp: int, dp: int) -> str | None:
    """The tag to convert when the newest checkpoint under `root` has another layout."""
    found = _saved(root)
    if found is None:
        return None
    tag, cfg, saved_dp = found
    layout = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": saved_dp}
    if layout == {"tp": tp, "pp": pp, "dp": dp}:
        return None
    kv_heads = cfg.model.num_kv_heads
    if layout["tp"] != tp and (kv_heads % tp or kv_heads % layout["tp"]):
        raise UserError(
            f"{Path(root) / tag} was saved at tp={layout['tp']}; resuming at tp={tp} with "
            f"{kv_heads} key/value heads splits a kv group's fused QKV rows across ranks, which "
            "the universal checkpoint cannot re-slice. Choose a TP size dividing the kv heads."
        )
    log.info(
        "layout change %s -> tp=%d pp=%d dp=%d: via a universal checkpoint", layout, tp, pp, dp
    )
    return tag


def require_converted(root: str, tag: str, tp: int, pp: int, dp: int) -> str:
    """The universal tag of TAG when its offline conversion is complete; otherwise a UserError
    naming the command that makes it (convert/to_universal.py). Never converted here: a 176B
    conversion takes most of an hour, behind a collective timeout of minutes."""
    if checkpoint_format.universal_complete(Path(root), tag):
        return tag + SUFFIX
    raise UserError(
        f"{Path(root) / tag} was saved at another layout than this run's tp={tp} pp={pp} "
        f"dp={dp}; a layout change loads a universal checkpoint made offline first (in parallel, "
        "resumable; a 176B model takes tens of minutes). Run\n"
        f"  megatron-ext convert reshard --with-optimizer --checkpoint {root} --universal "
        f"--workers {max(1, min(8, os.cpu_count() or 1))}\n"
        "then start this run again"
    )
