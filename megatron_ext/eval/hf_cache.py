"""The Hugging Face conversion that `eval --checkpoint` evaluates, cached next to the checkpoint
and keyed by the checkpoint's content, not by its tag name alone.

    DIR/hf-cache/<tag>/                          the converted model (export_hf's layout)
    DIR/hf-cache/<tag>/megatron_ext_source.json  {"checkpoint": tag dir, "content_key": ...}

The key is the manifest's digest (every file's name, size and CRC-32); for a manifest without
checksums (format 1), or no manifest, the files' sizes and modification times go in too. A
checkpoint saved again under the same tag (a rerun, a copied-in replacement) gets a fresh
conversion, which replaces the stale one only once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from megatron_ext.errors import UserError
from megatron_ext.log import get_logger

log = get_logger(__name__)

SOURCE_FILE = "megatron_ext_source.json"


def _stamps(tag_dir: Path, names: list[str]) -> str:
    lines = []
    for name in sorted(names):
        try:
            st = (tag_dir / name).stat()
            lines.append(f"{name}\t{st.st_size}\t{st.st_mtime_ns}")
        except OSError:
            lines.append(f"{name}\tmissing")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def content_key(tag_dir: Path) -> str:
    """A key that changes whenever the checkpoint in `tag_dir` does (see the module docstring)."""
    from megatron_ext.checkpoint_format import CheckpointRefused, Manifest

    try:
        manifest = Manifest(tag_dir)
    except CheckpointRefused:  # none or unreadable: what is there, by size and mtime
        names = [str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*") if p.is_file()]
        return f"files-{_stamps(tag_dir, names)}"
    if manifest.has_checksums:
        return manifest.digest()
    return f"{manifest.digest()}-{_stamps(tag_dir, list(manifest.files))}"


def cached_key(cached: Path) -> str | None:
    """The content key a conversion was made from (None: none recorded, or no conversion)."""
    try:
        key = json.loads((cached / SOURCE_FILE).read_text(encoding="utf-8")).get("content_key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) and (cached / "config.json").is_file() else None


def _has_tokenizer(hf_dir: Path) -> bool:
    return any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def _convert(tag_dir: Path, cached: Path, tokenizer: str | Path, key: str) -> Path:
    """Export into a hidden sibling, then swap it in for `cached` (the stale one goes last)."""
    from megatron_ext.convert.driver import export_hf

    new = cached.parent / f".{cached.name}.new-{os.getpid()}"
    old = cached.parent / f".{cached.name}.old-{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    try:
        export_hf(tag_dir, new, tokenizer_dir=tokenizer)
        source = {"checkpoint": str(tag_dir), "content_key": key}
        (new / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
        if cached.exists():
            cached.rename(old)
        new.rename(cached)
    finally:
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return cached


def hf_cache_for(checkpoint: str | Path, iteration: int | None, tokenizer: str | None) -> Path:
    """DIR/hf-cache/<tag>: the checkpoint as a Hugging Face dir, converted on first use and
    again when the checkpoint's content changed (without --tokenizer, the previous
    conversion's tokenizer is reused)."""
    from megatron_ext.convert import layout

    tag_dir = layout.resolve_tag_dir(checkpoint, iteration)
    cached = tag_dir.parent / "hf-cache" / tag_dir.name
    key = content_key(tag_dir)
    if cached_key(cached) == key:
        log.info("using the converted checkpoint in %s", cached)
        return cached
    stale = (cached / "config.json").is_file()
    if tokenizer is None and stale and _has_tokenizer(cached):
        log.info("reusing the tokenizer of the previous conversion in %s", cached)
        tokenizer = cached
    if tokenizer is None:
        raise UserError(
            f"{tag_dir}: not converted yet and no --tokenizer given; pass the tokenizer dir "
            "the run was trained with (it is copied next to the weights)"
        )
    if stale:
        log.info("%s changed since %s was converted from it: converting again", tag_dir, cached)
    log.info("converting %s to Hugging Face in %s", tag_dir, cached)
    return _convert(tag_dir, cached, tokenizer, key)
