"""``quantized_layers`` finds every quantized layer kind by its surface, on every Python version."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.api import prepare
from lowbit.config import QuantConfig, QuantSpec
from lowbit.quant.modules import is_quant_layer, quantized_layers
from lowbit.quant.quantizer import Quantizer


def test_every_prepared_layer_is_found_and_nothing_else() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    prepare(model, QuantConfig(weight=QuantSpec(bits=4), act=None))
    assert [n for n, _ in quantized_layers(model)] == ["0", "3"]
    assert not is_quant_layer(nn.Linear(2, 2)) and not is_quant_layer(model[0].weight_quantizer)
    assert not is_quant_layer(nn.ReLU()) and not is_quant_layer(Quantizer(QuantSpec(bits=4), (2, 2)))
