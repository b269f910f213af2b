"""Reference models for 28×28 single-channel images and 10 classes, and the one registry of them.

``build_model(name, **kwargs)`` looks ``name`` up in ``MODELS`` and calls the constructor, after
checking every keyword against the constructor's signature, so that a misspelt recipe key is an
error naming the key rather than a ``TypeError`` deep inside. Each constructor bounds its own
arguments (so the number of modules stays small); ``build_model`` first builds the model on the meta
device, which allocates nothing, and refuses one of more than ``MAX_PARAMETERS`` parameters before
any memory is spent on it.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models.birealnet import BiRealNet
from lowbit.models.mlp import MLP
from lowbit.models.mobilenet import MobileNetV2
from lowbit.models.resnet import ResNet

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "resnet": ResNet,
    "mobilenetv2": MobileNetV2,
    "birealnet": BiRealNet,
}
MAX_PARAMETERS = 100_000_000  # 400 MB of float32 weights: far beyond a reference model for 28×28 images


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
    with torch.device("meta"):
        count = sum(p.numel() for p in MODELS[name](**kwargs).parameters())
    if count > MAX_PARAMETERS:
        raise ConfigError(
            f"model {name!r} with {kwargs}: {count:_} parameters is more than the {MAX_PARAMETERS:_} allowed: "
            "use a smaller width or depth"
        )
    model = MODELS[name](**kwargs)
    # how lowbit.save records the architecture, so that lowbit.load can rebuild it (survives deepcopy)
    model.lowbit_architecture = {"registry": name, "args": dict(kwargs)}
    return model


__all__ = ["BiRealNet", "MLP", "MAX_PARAMETERS", "MODELS", "MobileNetV2", "ResNet", "build_model", "model_arguments"]
