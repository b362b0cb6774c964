"""Structural checks of JSON read from disk (recipe.json, engine.json): one-line errors that name the field.

A schema is a plain description: a type or tuple of types (``int`` never matches ``bool``; ``None`` allows
null), ``[item]`` for a list of items, ``{key: schema}`` for an object (extra keys are allowed, for forward
compatibility), ``MapOf(schema)`` for an object of arbitrary keys, and ``Opt(schema)`` for a key that may be
missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qexport.errors import QexportError

NUMBER = (int, float)


@dataclass(frozen=True)
class Opt:
    """A key that may be absent."""

    schema: Any


@dataclass(frozen=True)
class MapOf:
    """An object whose every value matches ``schema``."""

    schema: Any


def _type_name(t) -> str:
    return "null" if t is None or t is type(None) else {int: "integer", float: "number", str: "string",
                                                        bool: "boolean", dict: "object", list: "list"}.get(t, str(t))


def _matches(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    for t in types:
        if t is None:
            if value is None:
                return True
        elif t is int or t is float:
            if isinstance(value, t) and not isinstance(value, bool):
                return True
        elif isinstance(value, t):
            return True
    return False


def check(value, schema, path: str, where: str, fix: str) -> None:
    """Raise a one-line QexportError naming ``path`` if ``value`` does not match ``schema``.

    Args:
        value: the parsed JSON value.
        schema: see the module docstring.
        path: the field's dotted path, for the message (``plan.layers[2].weight.bits``).
        where: the file, for the message.
        fix: what to do about it (``recalibrate``).
    """
    if isinstance(schema, Opt):
        schema = schema.schema
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise QexportError(f"{where}: field {path} must be an object, got {_describe(value)}; {fix}")
        for key, sub in schema.items():
            if key not in value:
                if isinstance(sub, Opt):
                    continue
                raise QexportError(f"{where}: field {path}.{key} is missing; {fix}".replace(": field .", ": field "))
            check(value[key], sub, f"{path}.{key}" if path else key, where, fix)
    elif isinstance(schema, MapOf):
        if not isinstance(value, dict):
            raise QexportError(f"{where}: field {path} must be an object, got {_describe(value)}; {fix}")
        for key, v in value.items():
            check(v, schema.schema, f"{path}.{key}", where, fix)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise QexportError(f"{where}: field {path} must be a list, got {_describe(value)}; {fix}")
        for i, v in enumerate(value):
            check(v, schema[0], f"{path}[{i}]", where, fix)
    elif not _matches(value, schema):
        want = " or ".join(_type_name(t) for t in (schema if isinstance(schema, tuple) else (schema,)))
        raise QexportError(f"{where}: field {path} must be {want}, got {_describe(value)}; {fix}")


def _describe(value) -> str:
    text = repr(value)
    return f"{_type_name(type(value))} {text[:40] + '...' if len(text) > 40 else text}"
