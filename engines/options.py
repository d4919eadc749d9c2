"""Typed engine options: each variant family declares a dataclass, and `parse_options` builds it from the
loose dict that the registry defaults, the CLI's --option and the app hand over.

An unknown key, a value of the wrong type or a value outside its choices is an EngineError that names
the valid keys or values, so `--option kv_cache_dtype=fp8` on bf16 is refused instead of ignored.
Field metadata declares the checks: `choices` (allowed values) and `minimum` (inclusive lower bound).
Values are coerced the way a command line types them: "true"/"false" for bools, whole numbers for ints.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from engines.protocol import EngineError

OptionsT = TypeVar("OptionsT")
_NONE = type(None)


def option(default: Any, *, choices: tuple | None = None, minimum: float | None = None, doc: str = "") -> Any:
    """A dataclass field with its checks in the metadata."""
    return dataclasses.field(default=default, metadata={"choices": choices, "minimum": minimum, "doc": doc})


def parse_options(cls: type[OptionsT], engine: str, options: dict, ignored: tuple[str, ...] = ()) -> OptionsT:
    """Build `cls` from `options`, refusing unknown keys (except `ignored`) and bad values."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(options) - set(fields) - set(ignored))
    if unknown:
        raise EngineError(f"{engine}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    values = {}
    for key, value in options.items():
        if key not in fields:
            continue
        values[key] = _coerce(engine, key, value, hints[key])
        _check(engine, key, values[key], fields[key].metadata)
    return cls(**values)


def _coerce(engine: str, key: str, value: Any, hint: Any) -> Any:
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and _NONE in kinds:
        return None
    kind = next(kind for kind in kinds if kind is not _NONE)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise EngineError(f"{engine}: option {key} must be {_kind_name(kind)}, got {value!r}")


def _check(engine: str, key: str, value: Any, metadata) -> None:
    if value is None:
        return
    choices, minimum = metadata.get("choices"), metadata.get("minimum")
    if choices is not None and value not in choices:
        raise EngineError(f"{engine}: option {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if minimum is not None and value < minimum:
        kind = "a whole number" if isinstance(value, int) else "a number"
        raise EngineError(f"{engine}: option {key} must be {kind} >= {minimum}, got {value!r}")


def _kind_name(kind: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(kind, str(kind))
