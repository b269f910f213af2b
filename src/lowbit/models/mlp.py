"""A multilayer perceptron for small images: the simplest model every quantizer must handle.

    x (N, C, H, W) -> flatten (N, C·H·W) -> depth × [Linear(width) -> BatchNorm1d -> act] -> Linear(num_classes)

``act`` is ReLU by default; ``hardtanh`` makes the binary MLP (binary activations are the sign of the
next layer's input, and the sign of a ReLU output is always +1, while sign(hardtanh(x)) = sign(x)).

``depth=0`` is a linear classifier. Hidden Linear layers have no bias (the BatchNorm after them
has one), so folding BatchNorm into them for export changes no parameter count; ``batch_norm=False``
leaves BatchNorm out (the hidden layers get a bias instead): a model whose output for a sample does not
depend on the rest of its batch. Hidden weights are
Kaiming-normal (fan_in, ReLU gain); the classifier is N(0, 0.01²) so the initial loss is ≈ ln(10).
Module names: ``features.1`` is the first hidden Linear, ``classifier`` the last layer.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import require_int
from lowbit.errors import ConfigError

ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "hardtanh": nn.Hardtanh}


class MLP(nn.Module):
    """Flatten, ``depth`` × (Linear + BatchNorm1d + ReLU) of ``width`` units, then a Linear classifier."""

    def __init__(
        self,
        width: int = 256,
        depth: int = 2,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        act: str = "relu",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        require_int("MLP", "width", width, 1, 65_536)
        require_int("MLP", "depth", depth, 0, 256)
        require_int("MLP", "num_classes", num_classes, 2, 100_000)
        require_int("MLP", "in_channels", in_channels, 1, 1024)
        require_int("MLP", "image_size", image_size, 1, 4096)
        if act not in ACTIVATIONS:
            raise ConfigError(f"MLP: act={act!r} is not allowed: use one of {', '.join(ACTIVATIONS)}")
        if not isinstance(batch_norm, bool):
            raise ConfigError(f"MLP: batch_norm={batch_norm!r} is not allowed: use true or false")
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_channels * image_size * image_size
        for _ in range(depth):
            norm = [nn.BatchNorm1d(width)] if batch_norm else []
            layers += [nn.Linear(fan_in, width, bias=not batch_norm), *norm, ACTIVATIONS[act]()]
            fan_in = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(fan_in, num_classes)
        for m in self.features.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))  # (N, num_classes)
