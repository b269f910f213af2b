"""QAT methods: small objects with ``attach``, ``loss``, ``step``, ``state_dict``, ``load_state_dict``.

``METHODS`` maps recipe names to constructors; the training loop builds them from here and never asks
which one it holds. ``loss(model, batch, outputs)`` sees the batch and the model's outputs (a method
that distils needs them). Besides the five required calls a method may define these optional hooks,
declared in the same ``Method`` Protocol, which the loop calls through ``call_hooks`` on every method
that has them:

- ``use_float_model(load)``: ``load()`` returns the run's float model (from its cache), for methods that
  compare against it (distillation); called after ``attach`` on fresh and resumed runs alike;
- ``start(model, losses, step)``: runs when a stage starts or resumes at ``step``, after the methods'
  state is loaded; ``losses(s)`` yields the task loss on each training batch from step ``s`` on (the
  same sequence every time), for methods that measure gradients or curvature outside the training step;
- ``metrics(model) -> dict``: diagnostics merged into each evaluation row of ``metrics.jsonl``;
- ``before_eval(model, batches) -> bool``: runs before an evaluation (``batches`` yields training
  inputs); returns whether it changed the model, in which case the loop evaluates before and after;
- ``finish(model, batches)``: runs once after training, before the final evaluation and ``convert``;
- ``unsupported(layer) -> str | None``: why the method cannot run on this layer kind (``attach_methods``
  turns it into a ``ConfigError`` naming the layer; the contract table skips the pair and says why);
- ``param_groups(model) -> list[dict]``: parameters the method optimizes itself (binary latent weights
  under Bop or CEMA): torch parameter groups, each with an ``optimizer`` key holding the optimizer
  class; the loop takes them out of its own optimizers, then steps, clips and checkpoints them;
- ``report(rows) -> lowbit.figures.Section``: the method's part of the run report.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.errors import ConfigError

__all__ = ["Method", "METHODS", "build_methods", "call_hooks", "attach_methods"]


class Method(Protocol):
    def attach(self, model: nn.Module) -> None: ...
    def loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None: ...
    def step(self, step: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # optional hooks (called through call_hooks only on methods that define them)
    # def use_float_model(self, load: Callable[[], nn.Module]) -> None: ...
    # def start(self, model: nn.Module, losses: Callable[[int], Iterator[Tensor]], step: int) -> None: ...
    # def metrics(self, model: nn.Module) -> dict[str, Any]: ...
    # def before_eval(self, model: nn.Module, batches: Iterable[Any]) -> bool: ...
    # def finish(self, model: nn.Module, batches: Iterable[Any]) -> None: ...
    # def unsupported(self, layer: nn.Module) -> str | None: ...
    # def param_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...
    # def report(self, rows: list[dict[str, Any]]) -> Section: ...


def _registry() -> dict[str, Any]:
    from lowbit.methods.binary import Binary
    from lowbit.methods.bn import BNReestimation
    from lowbit.methods.distill import Distill
    from lowbit.methods.oscillation import OscillationDampening, OscillationFreezing, OscillationTracking
    from lowbit.methods.qbitopt import QBitOpt
    from lowbit.methods.resiliency import Resiliency

    return {
        "oscillation_tracking": OscillationTracking,
        "oscillation_dampening": OscillationDampening,
        "oscillation_freezing": OscillationFreezing,
        "bn_reestimation": BNReestimation,
        "resiliency": Resiliency,
        "qbitopt": QBitOpt,
        "distill": Distill,
        "binary": Binary,
    }


METHODS: dict[str, Any] = _registry()


def call_hooks(methods: list[Method], hook: str, *args: Any) -> list[Any]:
    """Call the optional ``hook`` on every method that defines it; returns their results in order."""
    return [getattr(m, hook)(*args) for m in methods if callable(getattr(m, hook, None))]


def build_methods(specs: tuple[dict[str, Any], ...] | list[dict[str, Any]], total_steps: int) -> list[Method]:
    """Instantiate recipe method entries ``{name: ..., **settings}``; ``total_steps`` feeds schedules.

    Each method's settings are its frozen ``Settings`` dataclass, built like every other recipe section:
    an unknown key or a value of the wrong type is a ``ConfigError`` naming ``methods[i].key``.
    """
    from lowbit.validate import build_dataclass

    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ConfigError(f"methods[{i}]={spec!r} is not allowed: expected a mapping {{name: ..., ...}}")
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if name not in METHODS:
            allowed = ", ".join(sorted(METHODS)) or "none are available yet"
            raise ConfigError(f"methods[{i}].name={name!r} is not allowed: known methods are {allowed}")
        cls = METHODS[name]
        settings = build_dataclass(cls.Settings, kwargs, f"methods[{i}]")
        out.append(cls(total_steps, **{f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}))
    return out


def attach_methods(methods: list[Method], model: nn.Module, names: list[str] | None = None) -> None:
    """``attach`` every method, after checking each supports every quantized layer kind of ``model``."""
    from lowbit.quant.modules import quantized_layers

    layers = quantized_layers(model)
    for i, m in enumerate(methods):
        check = getattr(m, "unsupported", None)
        for name, layer in layers if callable(check) else []:
            why = check(layer)
            if why:
                label = names[i] if names else type(m).__name__
                raise ConfigError(f"methods[{i}] ({label}) cannot run on layer {name!r}: {why}")
        m.attach(model)
