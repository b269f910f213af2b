"""Turning plain data (YAML, overrides, JSON) into validated frozen dataclasses, and back.

Every failure is a ``ConfigError`` naming the field as a dotted path (``qat.epochs``,
``methods[0].momentum``), the value and what is allowed. ``build_dataclass`` converts each value to its
annotated type (nested dataclasses, unions, tuples, numbers, booleans, strings) and merges a partial
mapping over a default instance; unknown keys are errors, never ignored. ``apply_overrides`` applies
``a.b=c`` strings (values parsed as YAML) to a mapping before it is built.

YAML (recipe files, override values, sweep axes) is read by ``parse_yaml`` / ``read_yaml`` alone, which
let in plain data only: null, booleans, integers, floats, strings, lists and mappings with string keys.
They refuse anchors and aliases (a few hundred bytes of "billion laughs" expand to gigabytes once
copied), every other tag (``!!binary``, ``!!set``, ``!!timestamp``, ``!!python/...``, custom ones; an
unquoted date stays a string), documents over ``MAX_YAML_BYTES``, nesting deeper than ``MAX_YAML_DEPTH``
(the top mapping and the leaf value count as levels), more than ``MAX_YAML_NODES`` values, and files that
are not UTF-8 text, each as a ``ConfigError`` naming the source and, for YAML, the line and the column.
Numbers the dataclasses accept are finite and inside the bounds each field states (``check_int``,
``check_number``): a float field never takes ``.inf`` or ``.nan``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lowbit.errors import ConfigError

__all__ = [
    "check", "check_int", "check_number", "is_int", "is_number", "require_int", "show", "build_dataclass",
    "field_default", "to_plain", "apply_overrides", "parse_yaml", "read_yaml", "INHERIT", "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH", "MAX_YAML_NODES", "MAX_YAML_INT_BITS",
]  # fmt: skip

INHERIT = "inherit"  # a rule's spec that takes the config's own
# A shipped recipe is under 2 KiB, about 50 values, 5 levels deep; a sweep axis of 1,000 values is 1,001.
MAX_YAML_BYTES = 256 * 1024
MAX_YAML_DEPTH = 16
MAX_YAML_NODES = 10_000
MAX_YAML_INT_BITS = 256  # larger integers are refused as read; 2**64 still reaches the field's own bounds


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: an error message never repeats a 200 KiB value."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for text
        return f"(an integer of {value.bit_length():_} bits)"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def check(ok: bool, field_name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{field_name}={show(value)} is not allowed: {allowed}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool); ints beyond the float range count as infinite."""
    if is_int(v):
        return -1e308 < v < 1e308
    return isinstance(v, float) and math.isfinite(v)


def check_int(field_name: str, value: Any, lo: int, hi: int, allowed: str | None = None) -> None:
    """An int (never a bool) in ``[lo, hi]``, else a ``ConfigError`` naming the field and the value."""
    check(is_int(value) and lo <= value <= hi, field_name, value, allowed or f"an integer from {lo} to {hi:_}")


def check_number(
    field_name: str, value: Any, lo: float, hi: float, allowed: str, *, open_lo: bool = False, open_hi: bool = False
) -> float:
    """``float(value)`` for a finite number in the interval ``lo..hi`` (ends open where asked), else a
    ``ConfigError``; ``allowed`` states the interval to the user."""
    ok = is_number(value) and (lo < value if open_lo else lo <= value) and (value < hi if open_hi else value <= hi)
    check(ok, field_name, value, allowed)
    return float(value)


def require_int(owner: str, field_name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int in ``[minimum, maximum]``, else a ``ConfigError`` naming owner, field and value."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f"an int >= {minimum}" if maximum is None else f"an int from {minimum} to {maximum:_}"
        raise ConfigError(f"{owner}: {field_name}={show(value)}; allowed {allowed}")
    return value


_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "str", "seq", "map"))


class _PlainLoader(yaml.SafeLoader):
    """SafeLoader that composes plain data only, within the limits above; see ``parse_yaml``."""

    # no implicit timestamps (a date stays a string), merge keys (<<), value (=) or yaml tags
    yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag in _PLAIN_TAGS]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    yaml_constructors = {k: v for k, v in yaml.SafeLoader.yaml_constructors.items() if k in _PLAIN_TAGS or k is None}

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.plain_depth = self.plain_nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            _refuse("anchors and aliases (&name, *name) are not allowed: write each value out", event.start_mark)
        self.plain_depth, self.plain_nodes = self.plain_depth + 1, self.plain_nodes + 1
        if self.plain_depth > MAX_YAML_DEPTH:
            _refuse(f"nesting deeper than {MAX_YAML_DEPTH} levels is not allowed", event.start_mark)
        if self.plain_nodes > MAX_YAML_NODES:
            _refuse(f"more than {MAX_YAML_NODES:_} values are not allowed", event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self.plain_depth -= 1
        if node.tag not in _PLAIN_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            _refuse(f"the tag {tag} is not allowed: use plain values (numbers, strings, true/false, null, lists, "
                    "mappings)", node.start_mark)  # fmt: skip
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                if key.tag != "tag:yaml.org,2002:str":
                    shown = repr(key.value[:40]) if isinstance(key, yaml.ScalarNode) else "[...]"
                    _refuse(f"the key {shown} is not allowed: mapping keys are names (strings)", key.start_mark)
        return node

    def construct_plain_number(self, node: Any) -> Any:
        try:
            value = yaml.SafeLoader.yaml_constructors[node.tag](self, node)
        except (ValueError, OverflowError) as e:
            _refuse(f"{node.value[:40]!r} is not a number YAML can read ({e})", node.start_mark)
        if isinstance(value, int) and value.bit_length() > MAX_YAML_INT_BITS:
            _refuse(f"{node.value[:20]!r}... has more than {MAX_YAML_INT_BITS} bits: no setting is that large",
                    node.start_mark)  # fmt: skip
        return value


for _tag in ("int", "float"):
    _PlainLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"] = _PlainLoader.construct_plain_number


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that lowbit does not let in."""


def _refuse(problem: str, mark: Any) -> None:
    raise _Refused(problem=problem, problem_mark=mark)


def read_yaml(path: str | Path, where: str) -> Any:
    """``parse_yaml`` of the file at ``path``: UTF-8 text of at most ``MAX_YAML_BYTES``, else a ``ConfigError``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{where} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where} is not UTF-8 text (byte {e.start} is not): pass a YAML file") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_YAML_BYTES:_} bytes: a recipe is a few lines of YAML")
    return parse_yaml(text, where)


def parse_yaml(text: str, where: str) -> Any:
    """The plain data in the YAML ``text``; ``where`` (e.g. ``recipe 'a.yaml'``) starts every error."""
    if not isinstance(text, str):
        raise ConfigError(f"{where}: expected text, got {type(text).__name__}")
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where} is {len(text):_} characters long: at most {MAX_YAML_BYTES:_} are allowed")
    loader = None
    try:
        loader = _PlainLoader(text)
        node = loader.get_single_node()
        return None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        what = ":" if isinstance(e, _Refused) else " is not valid YAML:"
        raise ConfigError(f"{where}{what} {e.problem or e.context}{at}") from None
    except yaml.YAMLError as e:  # the reader's: a character YAML does not allow, with its position
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    finally:
        if loader is not None:
            loader.dispose()


_TYPE_NAMES = {float: "a finite number", int: "an integer", str: "a string", bool: "true or false", type(None): "null"}


def _type_name(tp: Any) -> str:
    return _TYPE_NAMES[tp] if tp in _TYPE_NAMES else str(getattr(tp, "__name__", tp))


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
        raise ConfigError(f"{path}={show(value)} is not allowed: expected {' or '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={show(value)} is not allowed: expected a mapping of {tp.__name__} fields")
        return build_dataclass(tp, value, path, inherit_from)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}={show(value)} is not allowed: expected a list")
        (inner, _) = typing.get_args(tp)
        return tuple(_convert(v, inner, f"{path}[{i}]", inherit_from) for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={show(value)} is not allowed: expected a mapping")
        return dict(value)
    if tp is float:
        if is_number(value):
            return float(value)
        raise ConfigError(f"{path}={show(value)} is not allowed: expected a finite number")
    if tp is int:
        if is_int(value):
            return value
        raise ConfigError(f"{path}={show(value)} is not allowed: expected an integer")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={show(value)} is not allowed: expected true or false")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}={show(value)} is not allowed: expected a string")
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
        msg = str(e)
        if path and any(msg.startswith((f"{n}=", f"{n}[")) for n in names):  # "epochs=..." -> "qat.epochs=..."
            raise ConfigError(f"{path}.{msg}") from None
        raise ConfigError(f"{path}: {msg}" if path else msg) from None


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _index(node: list[Any], key: str) -> int | None:
    return int(key) if key.isascii() and key.isdigit() and int(key) < len(node) else None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            j = _index(node, k)
            if j is None:
                raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is not a valid list index")
            node = node[j]
            continue
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict | list):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = nxt
    last = keys[-1]
    if isinstance(node, list):
        j = _index(node, last)
        if j is None:
            raise ConfigError(f"override {dotted!r}: {last!r} is not a valid list index")
        node[j] = value
    else:
        node[last] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed by ``parse_yaml``) to a recipe mapping, in order."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe={show(data)} is not allowed: expected a mapping of sections")
    try:
        out = json.loads(json.dumps(data))
    except (TypeError, ValueError, RecursionError):
        raise ConfigError("recipe is not allowed: it holds values other than plain data, or refers to itself") from None
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {show(item)} is not allowed: write key=value, e.g. qat.epochs=2")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"override {show(item)}: the value") if raw != "" else None
        _set_path(out, key.strip(), value)
    return out
