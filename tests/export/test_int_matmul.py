"""The integer matmul path of ``IntLinear``: exact int32 accumulators, outputs equal up to float rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, QuantSpec
from lowbit.export.intmodules import IntLinear, use_int_matmul


def _mlp(wbits: int, abits: int, granularity: str = "channel", act_symmetric: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    cfg = QuantConfig(
        weight=QuantSpec(bits=wbits, granularity=granularity),
        act=QuantSpec(bits=abits, symmetric=act_symmetric),
    )
    lowbit.prepare(model, cfg, calib=[torch.randn(64, 48)])
    return lowbit.convert(model)


@pytest.mark.parametrize(
    "wbits, abits, granularity, act_symmetric",
    [(8, 8, "channel", True), (4, 8, "tensor", True), (3, 4, "channel", False), (8, 8, "tensor", False)],
)
def test_int_path_equals_reference(wbits: int, abits: int, granularity: str, act_symmetric: bool) -> None:
    """Layer by layer on the same inputs: equal up to float rounding of the final scaling."""
    model = _mlp(wbits, abits, granularity, act_symmetric)
    x = torch.randn(37, 48, generator=torch.Generator().manual_seed(3)) * 2
    inputs: dict[str, torch.Tensor] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, IntLinear)}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0])) for n, m in layers.items()]
    ref = model(x)
    for h in hooks:
        h.remove()
    expect = {n: m(inputs[n]) for n, m in layers.items()}
    assert use_int_matmul(model) == 3
    for n, m in layers.items():
        assert m.int_matmul
        out = m(inputs[n])
        torch.testing.assert_close(out, expect[n], rtol=1e-5, atol=1e-6 * float(expect[n].abs().max()))
    # end to end, a value on a rounding boundary of a later quantizer may land one step away
    assert (model(x).argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    use_int_matmul(model, enabled=False)
    assert torch.equal(model(x), ref)


def test_accumulator_is_exact() -> None:
    model = _mlp(8, 8, act_symmetric=False)  # asymmetric 8-bit input: zero point and the 128 offset
    layer = model[0]
    layer.enable_int_matmul()
    x = torch.randn(5, 48)
    iq = layer.input_quantizer
    zx = int(iq.export_qparams()[1])
    ints = (iq.to_int(x).long() - zx) @ layer.qweight.weight_int.long().t()
    s = iq.export_qparams()[0] * layer.qweight.weight_scale
    torch.testing.assert_close(layer(x), ints.float() * s + layer.bias, rtol=0, atol=1e-6)


def test_ineligible_layers_stay_on_the_reference_path() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    lowbit.prepare(model, QuantConfig(weight=QuantSpec(bits=4, symmetric=False), act=QuantSpec(bits=8)),
                   calib=[torch.randn(8, 16)])
    int_model = lowbit.convert(model)
    assert use_int_matmul(int_model) == 0  # asymmetric weights
    cfg = QuantConfig(weight=QuantSpec(bits=8), act=None)
    no_act = lowbit.convert(lowbit.prepare(nn.Sequential(nn.Linear(16, 8)), cfg))
    assert use_int_matmul(no_act) == 0
