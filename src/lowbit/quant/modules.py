"""Quantized modules: ``QuantLinear`` and ``QuantConv2d``.

Each subclasses its float module one level deep and keeps the original parameter objects (an optimizer
built before ``prepare`` still points at them). A ``weight_quantizer`` fake-quantizes the weight and an
optional ``input_quantizer`` fake-quantizes the input activation::

    y = layer(q_in(x), q_w(W)) + b

Groups and depthwise convolutions need nothing special: the weight is per output channel along dim 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from lowbit.quant.quantizer import Quantizer

if TYPE_CHECKING:
    from lowbit.config import QuantSpec

__all__ = ["QuantLinear", "QuantConv2d", "QUANT_MODULES"]


def _attach_quantizers(
    mod: QuantLinear | QuantConv2d, weight: QuantSpec | None, act: QuantSpec | None, in_channels: int
) -> None:
    if weight is not None:
        mod.weight_quantizer = Quantizer(weight, tuple(mod.weight.shape))
    else:
        mod.weight_quantizer = None
    if act is not None:
        channels = in_channels if act.granularity == "channel" else None
        mod.input_quantizer = Quantizer(act, None, channels=channels)
    else:
        mod.input_quantizer = None


class QuantLinear(nn.Linear):
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    @classmethod
    def from_float(cls, mod: nn.Linear, weight: QuantSpec | None, act: QuantSpec | None) -> QuantLinear:
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        new.weight = mod.weight
        new.bias = mod.bias
        _attach_quantizers(new, weight, act, mod.in_features)
        new.train(mod.training)  # after attaching, so the quantizers get the layer's mode too
        return new.to(mod.weight.device)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def to_float(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        out.weight, out.bias = self.weight, self.bias
        return out


class QuantConv2d(nn.Conv2d):
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    @classmethod
    def from_float(cls, mod: nn.Conv2d, weight: QuantSpec | None, act: QuantSpec | None) -> QuantConv2d:
        new = cls(
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size,  # type: ignore[arg-type]
            stride=mod.stride,  # type: ignore[arg-type]
            padding=mod.padding,  # type: ignore[arg-type]
            dilation=mod.dilation,  # type: ignore[arg-type]
            groups=mod.groups,
            bias=mod.bias is not None,
            padding_mode=mod.padding_mode,
            device="meta",
        )
        new.weight = mod.weight
        new.bias = mod.bias
        _attach_quantizers(new, weight, act, mod.in_channels)
        new.train(mod.training)  # after attaching, so the quantizers get the layer's mode too
        return new.to(mod.weight.device)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def to_float(self) -> nn.Conv2d:
        out = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,  # type: ignore[arg-type]
            stride=self.stride,  # type: ignore[arg-type]
            padding=self.padding,  # type: ignore[arg-type]
            dilation=self.dilation,  # type: ignore[arg-type]
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        out.weight, out.bias = self.weight, self.bias
        return out


# float type -> quantized type; the one place that says which layers lowbit can quantize
QUANT_MODULES: dict[type[nn.Module], type[QuantLinear] | type[QuantConv2d]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Every ``Quantizer`` in ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
