"""Reference models for 28×28 single-channel images and 10 classes, and the one registry of them.

``build_model(name, **kwargs)`` looks ``name`` up in ``MODELS`` and calls the constructor, after
checking every keyword against the constructor's signature, so that a misspelt recipe key is an
error naming the key rather than a ``TypeError`` deep inside.
"""

from __future__ import annotations

import inspect

from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.mlp import MLP
from lowbit.models.mobilenet import MobileNetV2
from lowbit.models.resnet import ResNet

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "resnet": ResNet,
    "mobilenetv2": MobileNetV2,
}


def model_arguments(name: str) -> dict[str, object]:
    """The keyword arguments ``build_model(name, ...)`` accepts, with their defaults."""
    if name not in MODELS:
        raise ConfigError(f"model={name!r}: allowed {sorted(MODELS)}")
    params = inspect.signature(MODELS[name]).parameters
    return {k: p.default for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Construct the registered model ``name``; unknown names, keywords or values raise ConfigError."""
    accepted = model_arguments(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(f"model {name!r}: unknown argument(s) {unknown}; accepted: {', '.join(accepted)}")
    model = MODELS[name](**kwargs)
    # how lowbit.save records the architecture, so that lowbit.load can rebuild it (survives deepcopy)
    model.lowbit_architecture = {"registry": name, "args": dict(kwargs)}
    return model


__all__ = ["MLP", "MODELS", "MobileNetV2", "ResNet", "build_model", "model_arguments"]
