"""Small validators shared by the config dataclasses: each failure is a ``ConfigError`` naming the field,
the value and what is allowed."""

from __future__ import annotations

from typing import Any

from lowbit.errors import ConfigError

__all__ = ["check", "is_int", "require_int"]


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
