"""Quantized modules: ``QuantLinear`` and ``QuantConv2d``.

Each subclasses its float module one level deep and keeps the original parameter objects (an optimizer
built before ``prepare`` still points at them). A ``weight_quantizer`` fake-quantizes the weight and an
optional ``input_quantizer`` fake-quantizes the input activation::

    y = layer(q_in(x), q_w(W)) + b

Groups and depthwise convolutions need nothing special: the weight is per output channel along dim 0.

Every quantized layer kind (these two, and the low-rank LR-QAT layers of ``lowbit.methods.lrqat``)
offers the same surface, ``QuantLayer``, which methods, ``convert`` and the loop rely on:
``weight_quantizer`` / ``input_quantizer`` (either may be ``None``), ``weight_int(transform)`` (the
integers of the weight as a float tensor with straight-through gradients, the weight's shape),
``quantized_weight()`` (what the forward pass multiplies by) and ``set_bits(bits)``. Kinds whose weight
takes part in the backward pass also offer ``watch_weight_grad(fn)``: ``fn(grad)`` is called with the
loss's gradient w.r.t. the weight on every backward pass (sensitivities for bit reallocation); it
returns a handle whose ``remove()`` stops it. It is not part of ``QuantLayer``: QLoRA-style layers keep
their integers out of the graph and do not offer it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lowbit.quant.calibrate import init_range
from lowbit.quant.quantizer import Quantizer

if TYPE_CHECKING:
    from lowbit.config import LowRankSpec, QuantSpec

__all__ = ["QuantLinear", "QuantConv2d", "QUANT_MODULES", "QuantLayer", "is_quant_layer", "quantized_layers"]


class QuantLayer(Protocol):
    """What every quantized layer kind offers (see the module docstring)."""

    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    def weight_int(self, transform: bool = True) -> Tensor: ...
    def quantized_weight(self) -> Tensor: ...
    def set_bits(self, bits: int) -> None: ...


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized (fake-quant) layers of ``model``, of every kind, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_quant_layer(m)]


_SURFACE = ("weight_quantizer", "input_quantizer", "weight_int", "quantized_weight", "set_bits")


def is_quant_layer(m: nn.Module) -> bool:
    """Whether ``m`` offers ``QuantLayer``'s surface. Not ``isinstance`` on a runtime-checkable protocol:
    from Python 3.12 that looks attributes up statically, and misses the quantizers a module keeps among
    its submodules (every quantized layer was then invisible on 3.12)."""
    return all(hasattr(m, a) for a in _SURFACE)


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


def _ready(new: QuantLinear | QuantConv2d, like: nn.Module) -> QuantLinear | QuantConv2d:
    """``new`` in ``like``'s training mode and on its device, weight range initialised there."""
    new.train(like.training)  # after attaching, so the quantizers get the layer's mode too
    new = new.to(new.weight.device)
    if new.weight_quantizer is not None:
        init_range(new.weight_quantizer, new.weight)
    return new


def _weight_int(mod: QuantLinear | QuantConv2d, transform: bool) -> Tensor:
    if mod.weight_quantizer is None:
        raise ValueError(f"{type(mod).__name__} keeps its weight float: it has no integers")
    return mod.weight_quantizer.quantize_ste(mod.weight, transform)


def _set_bits(mod: QuantLinear | QuantConv2d, bits: int) -> None:
    if mod.weight_quantizer is None:
        raise ValueError(f"{type(mod).__name__} keeps its weight float: it has no bit width to set")
    mod.weight_quantizer.set_bits(bits)


def _watch_weight_grad(mod: QuantLinear | QuantConv2d, fn: Callable[[Tensor], None]) -> RemovableHandle:
    def hook(grad: Tensor) -> None:
        fn(grad)  # returns nothing: the gradient is left as it is

    return mod.weight.register_hook(hook)


class QuantLinear(nn.Linear):
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    @classmethod
    def from_float(
        cls, mod: nn.Linear, weight: QuantSpec | None, act: QuantSpec | None, lowrank: LowRankSpec | None = None
    ) -> QuantLinear:
        """The quantized layer over ``mod``'s own parameters, weight range initialised from the weight."""
        new = cls(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        new.weight = mod.weight
        new.bias = mod.bias
        _attach_quantizers(new, weight, act, mod.in_features)
        return _ready(new, mod)  # type: ignore[return-value]

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def weight_int(self, transform: bool = True) -> Tensor:
        return _weight_int(self, transform)

    def set_bits(self, bits: int) -> None:
        _set_bits(self, bits)

    def watch_weight_grad(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(grad)`` with the loss's gradient w.r.t. the latent weight on every backward pass."""
        return _watch_weight_grad(self, fn)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return nn.functional.linear(x, self.quantized_weight(), self.bias)



class QuantConv2d(nn.Conv2d):
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    @classmethod
    def from_float(
        cls, mod: nn.Conv2d, weight: QuantSpec | None, act: QuantSpec | None, lowrank: LowRankSpec | None = None
    ) -> QuantConv2d:
        """The quantized layer over ``mod``'s own parameters, weight range initialised from the weight."""
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
        return _ready(new, mod)  # type: ignore[return-value]

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight) if self.weight_quantizer is not None else self.weight

    def weight_int(self, transform: bool = True) -> Tensor:
        return _weight_int(self, transform)

    def set_bits(self, bits: int) -> None:
        _set_bits(self, bits)

    def watch_weight_grad(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(grad)`` with the loss's gradient w.r.t. the latent weight on every backward pass."""
        return _watch_weight_grad(self, fn)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return self._conv_forward(x, self.quantized_weight(), self.bias)



# float type -> quantized type; the one place that says which layers lowbit can quantize
QUANT_MODULES: dict[type[nn.Module], type[QuantLinear] | type[QuantConv2d]] = {
    nn.Linear: QuantLinear,
    nn.Conv2d: QuantConv2d,
}

