"""QAT methods: small objects with ``attach``, ``loss``, ``step``, ``state_dict``, ``load_state_dict``.

``METHODS`` maps recipe names to constructors; the training loop builds them from here and never asks
which one it holds. The five methods of lowbit register here as they land.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lowbit.errors import ConfigError

__all__ = ["Method", "METHODS", "build_methods"]


class Method(Protocol):
    def attach(self, model: nn.Module) -> None: ...
    def loss(self, model: nn.Module) -> torch.Tensor | None: ...
    def step(self, step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


METHODS: dict[str, Any] = {}


def build_methods(specs: tuple[dict[str, Any], ...] | list[dict[str, Any]], total_steps: int) -> list[Method]:
    """Instantiate recipe method entries ``{name: ..., **kwargs}``; ``total_steps`` feeds schedules."""
    out = []
    for i, spec in enumerate(specs):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name not in METHODS:
            allowed = ", ".join(sorted(METHODS)) or "none are available yet"
            raise ConfigError(f"methods[{i}].name={name!r} is not allowed: known methods are {allowed}")
        try:
            out.append(METHODS[name](total_steps=total_steps, **kwargs))
        except TypeError as e:
            raise ConfigError(f"methods[{i}] ({name}): {e}") from None
    return out
