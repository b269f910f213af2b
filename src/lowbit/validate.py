"""Turning plain data (YAML, overrides, JSON) into validated frozen dataclasses, and back.

Every failure is a ``ConfigError`` naming the field as a dotted path (``qat.epochs``,
``methods[0].momentum``), the value and what is allowed. ``build_dataclass`` converts each value to its
annotated type (nested dataclasses, unions, tuples, numbers, booleans, strings) and merges a partial
mapping over a default instance; unknown keys are errors, never ignored. ``apply_overrides`` applies
``a.b=c`` strings (values parsed as YAML) to a mapping before it is built.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

import yaml

from lowbit.errors import ConfigError

__all__ = [
    "check", "is_int", "require_int", "build_dataclass", "field_default", "to_plain", "apply_overrides", "INHERIT",
]  # fmt: skip

INHERIT = "inherit"  # a rule's spec that takes the config's own


def check(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={value!r} is not allowed: {allowed}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def require_int(owner: str, field_name: str, value: Any, minimum: int) -> int:
    """``value`` if it is an int >= ``minimum``, else a ``ConfigError`` naming owner, field and value."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{owner}: {field_name}={value!r}; allowed an int >= {minimum}")
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, inherit_from: Any = None) -> Any:
    """Convert a YAML value to the annotated type ``tp``; ``path`` names it in errors."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if value == INHERIT and any(typing.get_origin(a) is Literal for a in args):
            return INHERIT
        for a in args:
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return _convert(value, a, path, inherit_from)
        for a in args:
            if a is type(None) or typing.get_origin(a) is Literal:
                continue
            try:
                return _convert(value, a, path, inherit_from)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={value!r} is not allowed: expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} is not allowed: expected a mapping of {tp.__name__} fields")
        return build_dataclass(tp, value, path, inherit_from)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}={value!r} is not allowed: expected a list")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(v, inner, f"{path}[{i}]", inherit_from) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r} is not allowed: expected a mapping")
        return dict(value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}={value!r} is not allowed: expected a number")
    if tp is int:
        if is_int(value):
            return value
        raise ConfigError(f"{path}={value!r} is not allowed: expected an integer")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r} is not allowed: expected true or false")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={value!r} is not allowed: expected a string")
    return value


def field_default(cls: Any, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def build_dataclass(cls: Any, data: dict[str, Any], path: str, inherit_from: Any = None) -> Any:
    """``cls`` from ``data``; fields ``data`` leaves out come from ``inherit_from`` (an instance of ``cls``),
    else from the defaults. A nested section is merged over its own default the same way, so that
    ``qat: {epochs: 2}`` keeps the other fields of ``Recipe.qat``'s default."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(f"unknown key {where!r}: allowed keys here are {', '.join(names)}")
    kwargs: dict[str, Any] = {}
    if isinstance(inherit_from, cls):
        kwargs = {f.name: getattr(inherit_from, f.name) for f in dataclasses.fields(cls)}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        default = kwargs[key] if key in kwargs else field_default(cls, key)
        nested = default if dataclasses.is_dataclass(default) and isinstance(value, dict) else None
        kwargs[key] = _convert(value, hints[key], where, nested)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a valid list index")
            node = node[int(k)]
            continue
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {dotted!r}: {last!r} is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a recipe mapping, in order."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not allowed: write key=value, e.g. qat.epochs=2")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
        _set_path(out, key.strip(), value)
    return out
