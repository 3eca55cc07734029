"""Dataclass configs from YAML plus dotted overrides, and back to YAML.

Every component keeps a small dataclass config next to it; a run is one YAML file whose
sections are those dataclasses, overridden on the command line with `section.key=value`
(values parsed as YAML: `optim.lr=3e-4`, `parallel.tp=2`, `data.path=null`).
Unknown keys and wrongly typed values are errors naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from megatron_ext.errors import UserError

T = TypeVar("T")

MAX_YAML_BYTES = 8 << 20  # a run config, blend or profile is a few kB

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 80, 80
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 6


def short(value: Any) -> str:
    """repr of VALUE bounded to a few hundred characters, for error messages (a value can be
    a huge or self-referencing structure)."""
    return _SHORT.repr(value)


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (`*name`): nothing in a config needs them, and a few of
    them nested make a 500-byte file expand to gigabytes (the "billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str) -> Any:
    """YAML TEXT as plain data: safe types only, no aliases, at most MAX_YAML_BYTES.
    UserError naming WHERE on anything else."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{where}: {len(text)} bytes of YAML; a config is at most {MAX_YAML_BYTES}")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UserError(f"{where}: invalid YAML: {str(exc)[:600]}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_COERCERS: dict[type, Any] = {}


def register_coercer(tp: type, fn) -> None:
    """Build values of type TP from YAML with FN(value, where) (e.g. a model preset name or a
    preset plus fields -> ModelConfig), instead of field by field."""
    _COERCERS[tp] = fn


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type `tp` (dataclasses built recursively)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp in _COERCERS:
        return _COERCERS[tp](value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: invalid value {short(value)}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"{where}: {short(value)} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping for {_type_name(tp)}, got {short(value)}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {short(value)}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {short(value)}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if tp is int and isinstance(value, bool):
        raise UserError(f"{where}: expected int, got {short(value)}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise UserError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        listed = ", ".join(short(k).strip("'") for k in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise UserError(
            f"{where}: unknown key(s) {listed}{more}; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{where}: {exc}") from None


def to_dict(obj: Any) -> Any:
    """Plain dict/list/scalar form of a (nested) dataclass, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: list[str], where: str = "command line") -> dict:
    """Set `a.b.c=value` entries in a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"{where}: override {short(item)} is not of the form section.key=value")
        value = load_yaml(raw, f"{where}: the value of {short(item)}") if raw != "" else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"{where}: {short(key)}: {short(part)} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"{p}: {p.stat().st_size} bytes; a config file is at most {MAX_YAML_BYTES}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    data = load_yaml(text, str(p)) or {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of sections")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """YAML file (optional) + dotted overrides -> dataclass `cls`."""
    data = read_yaml(path) if path else {}
    apply_overrides(data, list(overrides))
    return from_dict(cls, data, where=str(path) if path else "config")


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text
