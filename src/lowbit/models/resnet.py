"""A small CIFAR-style residual network (He et al. 2016, "Deep Residual Learning", §4.2) for 28×28.

    stem:   conv3×3(C -> w) -> BN -> ReLU                                  28×28
    stages: blocks[i] × BasicBlock at width w·2^i; stage i > 0 starts with stride 2  28, 14, 7
    head:   global average pool -> Linear(num_classes)

    BasicBlock(x) = ReLU( BN(conv3×3(ReLU(BN(conv3×3(x))))) + shortcut(x) )

The shortcut is the identity, or conv1×1 + BN where the stride or width changes ("option B").
Convolutions have no bias (BatchNorm follows each one). At width 16 with blocks (1, 1, 1) the model
has about 78k parameters. Each ReLU is its own module (``relu1``, ``relu2``), so an activation
quantizer can be attached to every activation by module name.

Init: Kaiming-normal (fan_out, ReLU gain) for convolutions, BatchNorm weight 1 and bias 0, the
classifier N(0, 0.01²) with zero bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lowbit.config import require_int
from lowbit.errors import ConfigError
from lowbit.validate import show


class BasicBlock(nn.Module):
    """Two 3×3 conv+BN layers with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, ``len(blocks)`` stages of BasicBlocks (widths w, 2w, 4w, ...), average pool, Linear."""

    def __init__(
        self,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        num_classes: int = 10,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        require_int("ResNet", "width", width, 1, 4096)
        require_int("ResNet", "num_classes", num_classes, 2, 100_000)
        require_int("ResNet", "in_channels", in_channels, 1, 1024)
        if isinstance(blocks, str | bytes) or not isinstance(blocks, Sequence) or not 1 <= len(blocks) <= 6:
            raise ConfigError(f"ResNet: blocks={show(blocks)}; allowed 1 to 6 stages, each an int from 1 to 64")
        for i, n in enumerate(blocks):
            require_int("ResNet", f"blocks[{i}]", n, 1, 64)
        self.blocks = tuple(blocks)
        stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = [stem]
        channels = width
        for i, n in enumerate(self.blocks):
            out = width * 2**i
            stage = [BasicBlock(channels if j == 0 else out, out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*stage))
            channels = out
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (N, channels)
        return self.classifier(x)  # (N, num_classes)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
