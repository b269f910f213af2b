"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks") sized
for 28×28 greyscale images.

An inverted residual block with input channels c_in, expansion t and output channels c_out:

    expand:   conv1×1(c_in -> t·c_in) -> BN -> ReLU6          (omitted when t = 1)
    depthwise conv3×3(groups = t·c_in, stride s) -> BN -> ReLU6
    project:  conv1×1(t·c_in -> c_out) -> BN                    (linear bottleneck: no activation)
    output:   x + block(x) when s = 1 and c_in = c_out, else block(x)

The network is a stride-2 3×3 stem, the stages in ``STAGES`` (t, c, n, s: expansion, channels,
repeats, stride of the first repeat), a 1×1 last conv, global average pool, optional dropout and a
Linear classifier. The first stage uses t = 1; the others use ``expand_ratio`` (6 as in the paper).
Channel counts are c·width_mult rounded to a multiple of 8 (``make_divisible``, never more than 10 %
below the exact value); the last conv keeps its width for width_mult < 1, as in the paper.

For 28×28 inputs the stem halves the resolution at once (28 -> 14 -> 7 -> 4). On CPU the time of
a training step follows the size of the activations (depthwise convolutions and BatchNorm dominate),
not the parameter count, so the stages are thin at 14×14 and 7×7 and put most of the parameters in
the 4×4 stages, where they cost little: at width_mult = 1.0 the model has 49,226 parameters and a
float epoch of Fashion-MNIST (batch 128, 2 cores) takes about 22 s.

Module names follow torchvision: ``features.0.0`` is the stem conv, ``features.i.conv`` the layers
of block i, ``classifier`` the final Linear. Init: Kaiming-normal (fan_out) for convolutions,
BatchNorm weight 1 and bias 0, classifier N(0, 0.01²) with zero bias.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.config import require_int
from lowbit.errors import ConfigError
from lowbit.validate import show

# (expansion t, output channels c, repeats n, first stride s) at width_mult = 1; t of stage 0 is 1.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 8, 1, 1),  # 14×14
    (6, 16, 1, 2),  # 7×7
    (6, 32, 2, 2),  # 4×4
    (6, 40, 1, 1),  # 4×4
)
STEM_CHANNELS = 8
LAST_CHANNELS = 192


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going more than 10 % below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1×1), depthwise (3×3), project (1×1, linear); residual when shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(c_in, hidden, 1, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))
        layers += [nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 28×28 inputs; about 51k parameters at ``width_mult=1.0``."""

    def __init__(
        self,
        width_mult: float = 1.0,
        expand_ratio: int = 6,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, int | float) or not 0 < width_mult <= 8:
            raise ConfigError(f"MobileNetV2: width_mult={show(width_mult)}; allowed a number in (0, 8]")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ConfigError(f"MobileNetV2: dropout={show(dropout)}; allowed a number in [0, 1)")
        require_int("MobileNetV2", "expand_ratio", expand_ratio, 1, 64)
        require_int("MobileNetV2", "num_classes", num_classes, 2, 100_000)
        require_int("MobileNetV2", "in_channels", in_channels, 1, 1024)

        channels = make_divisible(STEM_CHANNELS * width_mult)
        blocks: list[nn.Module] = [_conv_bn(in_channels, channels, 3, 2)]
        for i, (t, c, n, s) in enumerate(STAGES):
            out = make_divisible(c * width_mult)
            for j in range(n):
                blocks.append(InvertedResidual(channels, out, s if j == 0 else 1, t if i == 0 else expand_ratio))
                channels = out
        last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        blocks.append(_conv_bn(channels, last, 1, 1))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (N, last)
        return self.classifier(self.dropout(x))  # (N, num_classes)
