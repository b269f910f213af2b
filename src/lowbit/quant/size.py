"""What a prepared model costs: bytes as saved, mean bit widths, multiply-accumulates.

``payload_bytes`` is the exported state without the file's header: each quantized weight packed at its
own bit width (``ceil(numel * bits / 8)``) with its float32 scales and zero points, input quantizers'
float32 scales, float adapters kept beside integers (QLoRA-style), and every other parameter and floating
buffer at 32 bits. ``weight_bits`` is the mean weight width weighted by element counts (what
``summary.json`` records); bit reallocation (``lowbit.methods.qbitopt``) budgets against these.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.quant.modules import quantized_layers

__all__ = ["float_bytes", "payload_bytes", "weight_bits", "act_bits", "weight_numel"]


def float_bytes(model: nn.Module) -> int:
    """Bytes of the float model's floating-point state, each storage once (a tied head is counted once)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        if t.is_floating_point():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def weight_numel(layer: nn.Module) -> int:
    w = getattr(layer, "weight", None)
    return w.numel() if isinstance(w, torch.Tensor) else layer.out_features * layer.in_features


def payload_bytes(model: nn.Module) -> int:
    """Bytes of a prepared model's exported state without the file's header: each quantized weight packed
    at its bit width with its float32 scales and zero points, input quantizers' float32 scales, float
    adapters kept beside integers (QLoRA-style), every other parameter and floating buffer at 32 bits."""
    total = 0
    counted: set[int] = set()
    for _, layer in quantized_layers(model):
        wq, iq, n = layer.weight_quantizer, layer.input_quantizer, weight_numel(layer)
        if wq is None:
            total += 4 * n
        else:
            total += math.ceil(wq.nbits * n / 8) + 4 * wq.scale.numel()
            total += 4 * wq.zero_point.numel() if wq.zero_point is not None else 0
        if iq is not None:
            total += 4 * iq.scale.numel() * (2 if iq.zero_point is not None else 1)
        if hasattr(layer, "base_int"):  # QLoRA-style: its float adapters are exported beside the integers
            total += 4 * (layer.lora_a.numel() + layer.lora_b.numel())
        bias = getattr(layer, "bias", None)
        counted.update(id(t) for t in [*layer.parameters(), *layer.buffers()] if t is not bias)
    for t in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
        if id(t) not in counted:
            counted.add(id(t))
            total += 4 * t.numel()
    return total


def act_bits(model: nn.Module) -> float | None:
    """The mean bit width of the quantized layer inputs (one per layer; None: activations stay float)."""
    widths = [layer.input_quantizer.nbits for _, layer in quantized_layers(model) if layer.input_quantizer is not None]
    return sum(widths) / len(widths) if widths else None


def weight_bits(model: nn.Module) -> float | None:
    """The mean bit width of the quantized weights, weighted by their element counts (None: none)."""
    total = bits = 0
    for _, layer in quantized_layers(model):
        q = layer.weight_quantizer
        if q is not None:
            n = weight_numel(layer)
            total, bits = total + n, bits + n * q.nbits
    return None if total == 0 else bits / total
