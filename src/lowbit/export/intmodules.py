"""Integer modules: ``IntLinear`` and ``IntConv2d``, produced by ``lowbit.convert``.

They hold the integer weights (``weight_int``, int8 or int16 for unsigned 8-bit), the positive scale and
the integer zero point exactly as the weight quantizer produced them, and a frozen copy of the input
quantizer. The reference forward dequantizes the weight once (``s * (q - z)``, computed the same way as
in training) and caches it, so the outputs equal the fake-quant model's eval outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from lowbit.quant.modules import QuantConv2d, QuantLinear
from lowbit.quant.quantizer import Quantizer

__all__ = ["IntLinear", "IntConv2d", "dequantize_weight"]


def dequantize_weight(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, granularity: str, axis: int, group_size: int | None
) -> Tensor:
    """``s * (q - z)`` with ``scale`` in its stored shape, broadcast as the quantizer broadcasts it."""
    qf = q.to(torch.float32)
    if granularity == "group":
        assert group_size is not None
        view = qf.reshape(q.shape[0], -1, group_size)  # (rows, groups, group_size)
        s = scale.unsqueeze(-1)
        z = zero_point.unsqueeze(-1) if zero_point is not None else None
    else:
        view = qf
        if granularity == "channel":
            shape = [1] * q.dim()
            shape[axis if axis >= 0 else q.dim() + axis] = -1
            s = scale.reshape(shape)
            z = zero_point.reshape(shape) if zero_point is not None else None
        else:
            s, z = scale, zero_point
    out = (view - z) * s if z is not None else view * s
    return out.reshape(q.shape)


class _IntWeight(nn.Module):
    """Integer weight state shared by the integer layers (composition, not inheritance)."""

    def __init__(self, quant: QuantLinear | QuantConv2d) -> None:
        super().__init__()
        wq = quant.weight_quantizer
        self.input_quantizer = _frozen_copy(quant.input_quantizer)
        if wq is None:  # weight not quantized: keep float
            self.register_buffer("weight_float", quant.weight.detach().clone())
            self.weight_bits, self.granularity, self.axis, self.group_size = 32, "tensor", 0, None
            return
        qint = wq.to_int(quant.weight)
        qmin, qmax = wq.int_grid()
        dtype = torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16
        self.register_buffer("weight_int", qint.to(dtype))
        scale, zero_point = wq.export_qparams()
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.weight_bits = int(wq.bits)
        self.granularity, self.axis, self.group_size = wq.granularity, wq.axis, wq.group_size

    def dequantized(self) -> Tensor:
        if hasattr(self, "weight_float"):
            return self.weight_float
        return dequantize_weight(
            self.weight_int, self.weight_scale, self.weight_zero_point, self.granularity, self.axis, self.group_size
        )


def _frozen_copy(q: Quantizer | None) -> Quantizer | None:
    if q is None:
        return None
    c = copy.deepcopy(q)
    for p in c.parameters():
        p.requires_grad_(False)
    return c.eval()


class IntLinear(nn.Module):
    """Linear layer with integer weights; ``forward`` is the dequantize-once reference path."""

    def __init__(self, quant: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = quant.in_features, quant.out_features
        self.qweight = _IntWeight(quant)
        self.bias = None if quant.bias is None else nn.Parameter(quant.bias.detach().clone(), requires_grad=False)
        self.register_buffer("weight", self.qweight.dequantized(), persistent=False)  # the cache

    @property
    def input_quantizer(self) -> Quantizer | None:
        return self.qweight.input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight_bits={self.qweight.weight_bits}"


class IntConv2d(nn.Module):
    """Conv2d with integer weights; ``forward`` is the dequantize-once reference path."""

    def __init__(self, quant: QuantConv2d) -> None:
        super().__init__()
        self.in_channels, self.out_channels = quant.in_channels, quant.out_channels
        self.kernel_size, self.stride, self.padding = quant.kernel_size, quant.stride, quant.padding
        self.dilation, self.groups = quant.dilation, quant.groups
        self.padding_mode = quant.padding_mode
        self._pad = quant._reversed_padding_repeated_twice  # for non-zero padding modes, as nn.Conv2d
        self.qweight = _IntWeight(quant)
        self.bias = None if quant.bias is None else nn.Parameter(quant.bias.detach().clone(), requires_grad=False)
        self.register_buffer("weight", self.qweight.dequantized(), persistent=False)

    @property
    def input_quantizer(self) -> Quantizer | None:
        return self.qweight.input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.padding_mode != "zeros":
            x = nn.functional.pad(x, self._pad, mode=self.padding_mode)
            return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, weight_bits={self.qweight.weight_bits}"
        )


INT_MODULES: dict[type[nn.Module], type[nn.Module]] = {QuantLinear: IntLinear, QuantConv2d: IntConv2d}
