"""QAT methods: small objects with ``attach``, ``loss``, ``step``, ``state_dict``, ``load_state_dict``.

``METHODS`` maps recipe names to constructors; the training loop builds them from here and never asks
which one it holds. Besides the five required calls a method may define these optional hooks, which the
loop calls through ``call_hooks`` on every method that has them:

- ``metrics(model) -> dict``: diagnostics merged into each evaluation row of ``metrics.jsonl``;
- ``before_eval(model, batches) -> bool``: runs before an evaluation (``batches`` yields training
  inputs); returns whether it changed the model, in which case the loop evaluates before and after;
- ``finish(model, batches)``: runs once after training, before the final evaluation and ``convert``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lowbit.errors import ConfigError

__all__ = ["Method", "METHODS", "build_methods", "call_hooks"]


class Method(Protocol):
    def attach(self, model: nn.Module) -> None: ...
    def loss(self, model: nn.Module) -> torch.Tensor | None: ...
    def step(self, step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _registry() -> dict[str, Any]:
    from lowbit.methods.bn import BNReestimation
    from lowbit.methods.oscillation import OscillationDampening, OscillationFreezing, OscillationTracking
    from lowbit.methods.resiliency import Resiliency

    return {
        "oscillation_tracking": OscillationTracking,
        "oscillation_dampening": OscillationDampening,
        "oscillation_freezing": OscillationFreezing,
        "bn_reestimation": BNReestimation,
        "resiliency": Resiliency,
    }


METHODS: dict[str, Any] = _registry()


def call_hooks(methods: list[Method], hook: str, *args: Any) -> list[Any]:
    """Call the optional ``hook`` on every method that defines it; returns their results in order."""
    return [getattr(m, hook)(*args) for m in methods if callable(getattr(m, hook, None))]


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
