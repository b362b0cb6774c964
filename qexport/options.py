"""Options from config dataclasses: one definition per option, for the CLI, JSON files and recipes.

A method (or runtime) declares its options once, as a frozen dataclass whose fields carry their default and
their help text (``dataclasses.field(default=..., metadata={"help": "..."})``). This module turns such a class
into command-line flags (``--time-budget 30m``; ``--flag/--no-flag`` for booleans, or the field's own
``metadata["off_flag"]``), ``--opt key=value`` pairs, ``--options FILE.json`` files, help text, and a typed,
versioned record stored in recipes (tuples come back as tuples).

Field types are plain: ``int``, ``float``, ``str``, ``bool``, ``X | None``, unions of those, and
``tuple[X, ...]`` (given on the command line as comma-separated values).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexport.errors import QexportError

_NONE_WORDS = ("none", "null")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class OptionSpec:
    """One option of a config dataclass.

    Attributes:
        name: the field name (``time_budget``).
        tp: the resolved field type.
        default: the field's default (the only place it is defined).
        help: the field's help text.
        off_flag: the flag that sets a boolean to False (``--no-<name>`` unless the field names its own).
    """

    name: str
    tp: Any
    default: Any
    help: str
    off_flag: str | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_bool(self) -> bool:
        return _members(self.tp) == (bool,)

    @property
    def type_label(self) -> str:
        return type_label(self.tp)


def _members(tp) -> tuple:
    """The non-None members of a union type (or the type itself)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _optional(tp) -> bool:
    origin = typing.get_origin(tp)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(tp)


def type_label(tp) -> str:
    """A short human name of a field type: ``int``, ``float|none``, ``str|float``, ``float,...``."""
    parts = []
    for m in _members(tp):
        if typing.get_origin(m) is tuple:
            parts.append(",".join(type_label(a) for a in typing.get_args(m) if a is not Ellipsis) + ",...")
        else:
            parts.append(getattr(m, "__name__", str(m)))
    return "|".join(parts) + ("|none" if _optional(tp) else "")


def option_specs(config_cls: type) -> list[OptionSpec]:
    """The options of a config dataclass, in field order.

    Args:
        config_cls: a dataclass.

    Returns:
        One OptionSpec per field.
    """
    hints = typing.get_type_hints(config_cls)
    specs = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        tp = hints[f.name]
        off = f.metadata.get("off_flag") or ("--no-" + f.name.replace("_", "-") if _members(tp) == (bool,) else None)
        specs.append(OptionSpec(f.name, tp, default, str(f.metadata.get("help", "")), off))
    return specs


# ---------------------------------------------------------------------------------------------------------------
# Values: from command-line text and from JSON


class _BadValue(ValueError):
    pass


def _from_text(tp, text: str):
    """Parse command-line text as type ``tp`` (raises _BadValue)."""
    t = text.strip()
    if _optional(tp) and t.lower() in _NONE_WORDS:
        return None
    members = _members(tp)
    # numbers before strings: "--c 1.2" is the float 1.2, "--c auto" the string "auto"
    order = sorted(members, key=lambda m: {bool: 0, int: 1, float: 2}.get(m, 3 if m is not str else 4))
    for m in order:
        try:
            return _text_as(m, t)
        except _BadValue:
            continue
    raise _BadValue(f"expected {type_label(tp)}")


def _text_as(m, t: str):
    if typing.get_origin(m) is tuple:
        args = [a for a in typing.get_args(m) if a is not Ellipsis]
        items = [s for s in t.split(",") if s.strip()] if t else []
        return tuple(_text_as(args[0], s.strip()) for s in items)
    if m is bool:
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise _BadValue("expected true or false")
    if m is int:
        try:
            return int(t)
        except ValueError:
            raise _BadValue("expected an integer") from None
    if m is float:
        try:
            return float(t)
        except ValueError:
            raise _BadValue("expected a number") from None
    if m is str:
        return t
    raise _BadValue(f"unsupported option type {m!r}")


def _from_json(tp, value):
    """Check (and convert: int -> float, list -> tuple) a JSON value for type ``tp`` (raises _BadValue)."""
    if value is None:
        if _optional(tp):
            return None
        raise _BadValue(f"expected {type_label(tp)}, got null")
    for m in _members(tp):
        if typing.get_origin(m) is tuple and isinstance(value, (list, tuple)):
            args = [a for a in typing.get_args(m) if a is not Ellipsis]
            return tuple(_from_json(args[0], v) for v in value)
        if m is bool and isinstance(value, bool):
            return value
        if m is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if m is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if m is str and isinstance(value, str):
            return value
    if isinstance(value, str):  # "30m", "auto", "0.5" written as text in a JSON file
        return _from_text(tp, value)
    raise _BadValue(f"expected {type_label(tp)}, got {type(value).__name__} {value!r}")


def _to_json(value):
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# Building configs


def _known_option(specs: dict, key: str, owner: str) -> tuple:
    """(field name, its spec) for an option key (``time-budget`` or ``time_budget``); unknown keys are refused."""
    name = str(key).replace("-", "_")
    if name not in specs:
        raise QexportError(f"--{name.replace('_', '-')} does not apply to {owner}; its options: "
                           f"{', '.join(specs) or 'none'}")
    return name, specs[name]


def build_config(config_cls: type, values: dict, owner: str, *, from_text: bool = False):
    """Build ``config_cls`` from option values, checking every name and type.

    Args:
        config_cls: the dataclass.
        values: option name (``time_budget`` or ``time-budget``) -> value (text when ``from_text``, else JSON-like).
        owner: who takes the options, for messages (``--method adasg``).
        from_text: the values are command-line text.

    Returns:
        The config instance (its ``__post_init__`` validates the values).
    """
    specs = {s.name: s for s in option_specs(config_cls)}
    kwargs = {}
    for key, raw in values.items():
        name, spec = _known_option(specs, key, owner)
        try:
            kwargs[name] = _from_text(spec.tp, raw) if from_text and isinstance(raw, str) else _from_json(spec.tp, raw)
        except _BadValue as e:
            raise QexportError(f"option {spec.flag} of {owner}: bad value {raw!r} ({e})") from None
    try:
        return config_cls(**kwargs)
    except QexportError as e:
        raise QexportError(f"{owner}: {e}") from None
    except (TypeError, ValueError) as e:
        raise QexportError(f"{owner}: bad options ({e})") from None


def read_options_file(path: str | Path, owner: str) -> dict:
    """The options in a JSON file: one object of option name -> value.

    Args:
        path: the file.
        owner: for messages.

    Returns:
        The dict.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise QexportError(f"--options {p}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise QexportError(f"--options {p} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QexportError(f"--options {p} must hold one JSON object of option -> value for {owner}")
    return data


def parse_opt_pairs(pairs: list[str]) -> dict[str, str]:
    """``["iters=2000", "c=auto"]`` -> ``{"iters": "2000", "c": "auto"}``.

    Args:
        pairs: the ``--opt`` values.

    Returns:
        name -> text.
    """
    out = {}
    for p in pairs:
        key, sep, val = p.partition("=")
        if not sep or not key.strip():
            raise QexportError(f"--opt {p!r} must be key=value, e.g. --opt time_budget=30m")
        out[key.strip()] = val
    return out


# ---------------------------------------------------------------------------------------------------------------
# Records stored in recipes


def config_record(cfg) -> dict:
    """A typed, versioned JSON record of a config instance.

    Args:
        cfg: a config dataclass instance.

    Returns:
        ``{"type": "module:Class", "version": N, "values": {...}}`` (tuples as lists).
    """
    cls = type(cfg)
    return {"type": f"{cls.__module__}:{cls.__qualname__}", "version": int(getattr(cls, "VERSION", 1)),
            "values": {f.name: _to_json(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}}


def config_from_record(record: dict, config_cls: type, owner: str):
    """Rebuild a config from :func:`config_record`'s output (tuples restored by the field types).

    Args:
        record: the stored record.
        config_cls: the class the current code registers for it.
        owner: for messages.

    Returns:
        The config instance, equal to the one recorded.
    """
    if not isinstance(record, dict) or not isinstance(record.get("values"), dict):
        raise QexportError(f"{owner}: the recipe holds no typed options record (provenance.config); recalibrate")
    want = f"{config_cls.__module__}:{config_cls.__qualname__}"
    version = int(getattr(config_cls, "VERSION", 1))
    if record.get("type") != want:
        raise QexportError(f"{owner}: the recipe's options are a {record.get('type')!r}, this qexport uses {want!r}")
    if record.get("version") != version:
        raise QexportError(f"{owner}: the recipe's options have version {record.get('version')!r}, this qexport "
                           f"reads version {version}; recalibrate")
    return build_config(config_cls, record["values"], owner)


# ---------------------------------------------------------------------------------------------------------------
# Help


def options_help(config_cls: type, width: int = 100) -> str:
    """The options of a config class as indented help lines (flag, type, default, help).

    Args:
        config_cls: the dataclass.
        width: wrap width.

    Returns:
        Text.
    """
    import textwrap

    lines = []
    for s in option_specs(config_cls):
        flag = f"{s.flag}/{s.off_flag}" if s.is_bool else f"{s.flag} {s.type_label.upper()}"
        default = ",".join(map(str, s.default)) if isinstance(s.default, tuple) else s.default
        lines.append(f"  {flag}  [default: {default}]")
        for ln in textwrap.wrap(s.help or "(no help)", width - 6):
            lines.append("      " + ln)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Command-line flags


def typed_values(config_cls: type, values: dict, owner: str) -> dict:
    """Parse command-line values (text, or bools from ``--flag``/``--no-flag``) into typed values.

    Args:
        config_cls: the config class.
        values: name -> text or bool.
        owner: for messages.

    Returns:
        name -> typed value (tuples for tuple fields).
    """
    specs = {s.name: s for s in option_specs(config_cls)}
    out = {}
    for key, raw in values.items():
        name, _ = _known_option(specs, key, owner)
        if isinstance(raw, bool):
            out[name] = raw
            continue
        try:
            out[name] = _from_text(specs[name].tp, raw)
        except _BadValue as e:
            raise QexportError(f"option {specs[name].flag} of {owner}: bad value {raw!r} ({e})") from None
    return out
