"""A Bi-Real / ReActNet-style network for 28×28 images: the reference binary CNN.

Built float (it is pre-trained float like every model here); a recipe makes it binary with
``quant.weight`` and ``quant.act`` on the binary grid (``binary: {...}``), which turns each 3×3 block
convolution into a binary one: its input is binarised by the layer's input quantizer (sign, with the
ApproxSign gradient), its weight by the weight quantizer. ``first_last_bits`` keeps the stem and the
classifier on the integer grid, and a rule keeps the 1×1 ``downsample`` convolutions there too
(``recipes/birealnet-binary.yaml``)::

    stem:   conv3×3(1 → w) → BN                                   (features.0, features.1)
    block:  y = RPReLU( BN( conv3×3( x + b ) ) + shortcut(x) )       b: a learnable bias per channel (the
            shortcut: x, or AvgPool2d(2) → conv1×1 → BN where the block halves the size or widens)
    stages: widths w, 2w, 4w (blocks per stage ``blocks``), the first block of stages 2 and 3 at stride 2
            (features.2, features.3, ...)
    head:   global average pool → linear(4w → classes)           (classifier, initialised N(0, 0.01²))

The learnable bias moves each channel's sign threshold (ReActNet's RSign), and RPReLU,
``PReLU(x − γ) + ζ`` per channel, gives the block a learnable, shifted nonlinearity (ReActNet's RPReLU);
the real-valued shortcut around every binary convolution is Bi-Real Net's. Module names:
``features.0`` (stem), ``features.<k>.conv`` (block k − 2), ``features.<k>.downsample.1``, ``classifier``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lowbit.config import require_int

__all__ = ["BiRealNet", "LearnableBias", "RPReLU"]


class LearnableBias(nn.Module):
    """``x + b`` with one learnable ``b`` per channel (dim 1)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias.reshape(1, -1, *([1] * (x.dim() - 2)))


class RPReLU(nn.Module):
    """``PReLU(x − γ) + ζ`` per channel (ReActNet)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels, init=0.25)
        self.shift_out = LearnableBias(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.shift_out(self.prelu(self.shift_in(x)))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.move = LearnableBias(cin)
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            pool: nn.Module = nn.AvgPool2d(2) if stride != 1 else nn.Identity()
            self.downsample = nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = RPReLU(cout)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(self.move(x))) + self.downsample(x))


class BiRealNet(nn.Module):
    """Stem, three stages of real-shortcut 3×3 blocks (widths ``width``, 2·, 4·), pool, linear classifier."""

    def __init__(
        self, width: int = 16, blocks: int = 2, num_classes: int = 10, in_channels: int = 1, image_size: int = 28
    ) -> None:
        super().__init__()
        require_int("BiRealNet", "width", width, 1, 4096)
        require_int("BiRealNet", "blocks", blocks, 1, 64)
        require_int("BiRealNet", "num_classes", num_classes, 2, 100_000)
        require_int("BiRealNet", "in_channels", in_channels, 1, 1024)
        require_int("BiRealNet", "image_size", image_size, 4, 4096)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        cin = width
        for s, cout in enumerate((width, 2 * width, 4 * width)):
            layers += [Block(cin if b == 0 else cout, cout, 2 if (b == 0 and s > 0) else 1) for b in range(blocks)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))  # (N, num_classes)
