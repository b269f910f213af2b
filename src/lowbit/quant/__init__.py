"""Quantizer core: pure functions, the ``Quantizer`` module, range initialisation, quantized modules."""

from lowbit.quant.functional import (
    dequantize,
    fake_quantize,
    int_range,
    quantize,
    quantize_ste,
    round_ste,
)
from lowbit.quant.modules import QuantConv2d, QuantLinear
from lowbit.quant.quantizer import Quantizer

__all__ = [
    "dequantize",
    "fake_quantize",
    "int_range",
    "quantize",
    "quantize_ste",
    "round_ste",
    "Quantizer",
    "QuantLinear",
    "QuantConv2d",
]
