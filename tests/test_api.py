"""``lowbit.prepare`` and ``lowbit.convert`` on small models: swapping, rules, errors, exact export."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import lowbit
from lowbit import ConfigError, QuantConfig, QuantSpec, Rule
from lowbit.export.intmodules import IntConv2d, IntLinear
from lowbit.quant.modules import QuantConv2d, QuantLinear


def _convnet(seed: int = 0) -> nn.Sequential:
    """Conv, depthwise conv, pointwise conv, Linear; every weight's fan-in is a multiple of 4."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(4, 8, 1),
            bn=nn.BatchNorm2d(8),
            relu=nn.ReLU(),
            dw=nn.Conv2d(8, 8, 2, padding=1, groups=8),  # depthwise, weight (8, 1, 2, 2)
            relu2=nn.ReLU(),
            pw=nn.Conv2d(8, 16, 1, bias=False),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(16, 12),
            relu3=nn.ReLU(),
            head=nn.Linear(12, 4),
        )
    )


def _inputs(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 4, 6, 6, generator=torch.Generator().manual_seed(seed))


def _calib() -> list[torch.Tensor]:
    return [_inputs(8, seed=s) for s in (2, 3)]


LAYERS = ["stem", "dw", "pw", "fc", "head"]


# -- prepare ------------------------------------------------------------------------------------------


def test_prepare_swaps_layers_and_keeps_parameter_objects() -> None:
    model = _convnet()
    before = {n: p for n, p in model.named_parameters()}
    opt_params = list(model.parameters())
    out = lowbit.prepare(model, QuantConfig(), calib=_calib())
    assert out is model
    types = {n: type(getattr(model, n)) for n in LAYERS}
    assert types == {"stem": QuantConv2d, "dw": QuantConv2d, "pw": QuantConv2d, "fc": QuantLinear, "head": QuantLinear}
    assert model.dw.groups == 8 and model.dw.padding == (1, 1)
    after = {n: p for n, p in model.named_parameters() if "quantizer" not in n}
    assert after.keys() == before.keys()
    for n in before:
        assert after[n] is before[n], n
    assert all(any(p is q for q in model.parameters()) for p in opt_params)
    # every quantizer was initialised: weights from themselves, inputs from calib
    for n in LAYERS:
        layer = getattr(model, n)
        assert bool(layer.weight_quantizer.initialized)
        assert bool(layer.input_quantizer.initialized)
        assert layer.weight_quantizer.scale.shape == (layer.weight.shape[0],)  # default: per channel


def test_prepare_keeps_the_training_mode() -> None:
    for training in (True, False):
        for config, calib in ((QuantConfig(), _calib()), (QuantConfig(act=None), None)):
            model = _convnet().train(training)
            lowbit.prepare(model, config, calib=calib)
            assert all(m.training == training for m in model.modules())


def test_depthwise_per_channel_matches_naive() -> None:
    model = _convnet()
    lowbit.prepare(model, QuantConfig(act=None))
    dw = model.dw
    wq = dw.weight_quantizer
    s = lowbit.quant.functional.positive_scale(wq.scale).detach()
    qw = dw.quantized_weight()
    for c in range(8):
        expected = lowbit.quant.fake_quantize(dw.weight[c], s[c], None, -8, 7)
        assert torch.equal(qw[c], expected)


def test_rules_first_match_wins_and_skip() -> None:
    config = QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel"),
        act=QuantSpec(bits=4),
        rules=(
            Rule(match="f*", weight=QuantSpec(bits=2), act=None),
            Rule(match="fc", weight=QuantSpec(bits=6)),  # shadowed by the rule above
            Rule(match="d?", skip=True),
            Rule(match="head", weight=None),
        ),
    )
    model = _convnet()
    lowbit.prepare(model, config, calib=_calib())
    assert int(model.fc.weight_quantizer.bits) == 2 and model.fc.input_quantizer is None
    assert type(model.dw) is nn.Conv2d
    assert isinstance(model.head, QuantLinear)
    assert model.head.weight_quantizer is None and int(model.head.input_quantizer.bits) == 4
    assert int(model.stem.weight_quantizer.bits) == 4 and int(model.pw.input_quantizer.bits) == 4


def test_rule_matching_nothing_lists_candidates() -> None:
    config = QuantConfig(act=None, rules=(Rule(match="classifier", weight=QuantSpec(bits=8)),))
    with pytest.raises(ConfigError) as e:
        lowbit.prepare(_convnet(), config)
    msg = str(e.value)
    assert "classifier" in msg
    for n in LAYERS:
        assert n in msg


def test_first_last_bits() -> None:
    config = QuantConfig(weight=QuantSpec(bits=3, granularity="channel"), act=QuantSpec(bits=3), first_last_bits=8)
    model = _convnet()
    lowbit.prepare(model, config, calib=_calib())
    assert int(model.stem.weight_quantizer.bits) == 8 and model.stem.input_quantizer is None
    assert int(model.head.weight_quantizer.bits) == 8 and int(model.head.input_quantizer.bits) == 8
    for n in ("dw", "pw", "fc"):
        layer = getattr(model, n)
        assert int(layer.weight_quantizer.bits) == 3 and int(layer.input_quantizer.bits) == 3
    # a rule that matches the first layer wins over first_last_bits
    model = _convnet()
    rules = (Rule(match="stem", weight=QuantSpec(bits=2)),)
    lowbit.prepare(model, QuantConfig(act=None, first_last_bits=8, rules=rules))
    assert int(model.stem.weight_quantizer.bits) == 2 and int(model.head.weight_quantizer.bits) == 8


def test_prepare_errors() -> None:
    with pytest.raises(ConfigError, match="no quantizable layer"):
        lowbit.prepare(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), QuantConfig(act=None))
    with pytest.raises(ConfigError, match="calib"):
        lowbit.prepare(_convnet(), QuantConfig())
    model = lowbit.prepare(_convnet(), QuantConfig(act=None))
    with pytest.raises(ConfigError, match="once"):
        lowbit.prepare(model, QuantConfig(act=None))
    with pytest.raises(ConfigError, match="empty"):
        lowbit.prepare(_convnet(), QuantConfig(), calib=[])
    with pytest.raises(ConfigError, match="QuantConfig"):
        lowbit.prepare(_convnet(), {"weight": None})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nn.Sequential"):
        lowbit.prepare(nn.Linear(3, 3), QuantConfig(act=None))


def test_calibration_sets_activation_ranges() -> None:
    model = _convnet().train()
    calib = _calib()
    lowbit.prepare(model, QuantConfig(act=QuantSpec(bits=8, init="minmax")), calib=calib)
    assert model.training
    # the stem sees the raw inputs: symmetric signed 8-bit, scale = max|x| / 127
    amax = max(float(x.abs().max()) for x in calib)
    assert model.stem.input_quantizer.scale.item() == pytest.approx(amax / 127, rel=1e-6)
    # after ReLU: unsigned grid chosen from the data
    assert not bool(model.pw.input_quantizer.signed)
    assert bool(model.stem.input_quantizer.signed)


# -- convert ------------------------------------------------------------------------------------------

CONVERT_SPECS = {
    "tensor": QuantConfig(weight=QuantSpec(bits=4), act=QuantSpec(bits=4)),
    "channel": QuantConfig(weight=QuantSpec(bits=3, granularity="channel"), act=QuantSpec(bits=8), first_last_bits=8),
    "group": QuantConfig(weight=QuantSpec(bits=4, granularity="group", group_size=4), act=QuantSpec(bits=4)),
    "asym": QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel", symmetric=False),
        act=QuantSpec(bits=4, symmetric=False),
    ),
    "binary-asym-group": QuantConfig(
        weight=QuantSpec(bits=1, granularity="group", group_size=4, symmetric=False, init="minmax"),
        act=QuantSpec(bits=2, granularity="channel", init="lp"),
    ),
    "weights-only-8bit-unsigned": QuantConfig(weight=QuantSpec(bits=8, symmetric=False), act=None),
}


@pytest.mark.parametrize("name", list(CONVERT_SPECS))
def test_convert_equals_fake_quant_eval(name: str) -> None:
    model = lowbit.prepare(_convnet(), CONVERT_SPECS[name], calib=_calib())
    # a few training steps so scales, zero points and BN statistics move away from their init
    _train(model, steps=3)
    reference = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    int_model = lowbit.convert(model)
    # the original model is untouched (still quantized layers, same state, same mode)
    assert isinstance(model.fc, QuantLinear) and isinstance(model.stem, QuantConv2d)
    assert [m.training for m in model.modules()] == modes
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert not int_model.training
    x = _inputs(5, seed=9)
    with torch.no_grad():
        expected = model.eval()(x)
        got = int_model(x)
    assert torch.equal(got, expected)
    for n in LAYERS:
        q, i = getattr(model, n), getattr(int_model, n)
        assert isinstance(i, IntLinear | IntConv2d)
        if q.weight_quantizer is None:
            continue
        ints = q.weight_quantizer.to_int(q.weight)
        assert torch.equal(i.qweight.weight_int.to(torch.int32), ints)
        qmin, qmax = q.weight_quantizer.int_grid()
        assert int(ints.min()) >= qmin and int(ints.max()) <= qmax
        assert i.qweight.weight_int.dtype == (torch.int8 if qmax <= 127 else torch.int16)
        assert torch.equal(i.weight, q.quantized_weight())


def test_convert_with_float_weight_layer_and_skipped_layer() -> None:
    config = QuantConfig(act=QuantSpec(bits=8), rules=(Rule(match="head", weight=None), Rule(match="dw", skip=True)))
    model = lowbit.prepare(_convnet(), config, calib=_calib())
    int_model = lowbit.convert(model)
    assert type(int_model.dw) is nn.Conv2d
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(int_model(x), model.eval()(x))


def test_convert_inplace_and_errors() -> None:
    with pytest.raises(ConfigError, match="prepare"):
        lowbit.convert(_convnet())
    model = lowbit.prepare(_convnet(), QuantConfig(act=None))
    x = _inputs()
    with torch.no_grad():
        expected = model.eval()(x)
    out = lowbit.convert(model, inplace=True)
    assert out is model and isinstance(model.fc, IntLinear)
    with torch.no_grad():
        assert torch.equal(out(x), expected)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_convert_keeps_padding_modes(mode: str) -> None:
    model = lowbit.prepare(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode)), QuantConfig(act=None))
    x = torch.randn(3, 2, 6, 6)
    assert torch.equal(lowbit.convert(model)(x), model.eval()(x))


def test_convert_after_int_transform_uses_its_integers() -> None:
    class Zero(nn.Module):
        def forward(self, x_int: torch.Tensor, quantizer: object) -> torch.Tensor:
            return torch.zeros_like(x_int)

    model = lowbit.prepare(_convnet(), QuantConfig(act=None))
    model.fc.weight_quantizer.int_transform = Zero()
    int_model = lowbit.convert(model)
    assert torch.count_nonzero(int_model.fc.qweight.weight_int) == 0
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(int_model(x), model.eval()(x))


# -- training -----------------------------------------------------------------------------------------


def _train(model: nn.Module, steps: int, lr: float = 0.05) -> list[float]:
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, 4, (32,), generator=gen)
    x = torch.randn(32, 4, 6, 6, generator=gen)
    # a learnable task: the class is encoded in the signs of the first two channels' offsets
    x[:, 0] += (2 * (target // 2) - 1).float()[:, None, None]
    x[:, 1] += (2 * (target % 2) - 1).float()[:, None, None]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_optimizer_after_prepare_trains() -> None:
    model = lowbit.prepare(
        _convnet(), QuantConfig(weight=QuantSpec(bits=4, granularity="channel", symmetric=False)), calib=_calib()
    )
    names = [n for n, _ in model.named_parameters()]
    assert "fc.weight_quantizer.scale" in names and "fc.input_quantizer.scale" in names
    assert "fc.weight_quantizer.zero_point" in names
    scales = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("scale")}
    losses = _train(model, steps=20, lr=0.02)
    assert losses[-1] < 0.6 * losses[0]
    for n, p in model.named_parameters():
        if n.endswith("scale"):
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert not torch.equal(p.detach(), scales[n]), f"{n} did not move"
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("zero_point"))


# -- every registered model ----------------------------------------------------------------------------

try:
    from lowbit.models import MODELS, build_model
except Exception:  # the registry is optional for these tests
    MODELS, build_model = {}, None


@pytest.mark.parametrize("name", sorted(MODELS) or ["<none>"])
def test_registry_models_prepare_and_convert(name: str) -> None:
    if build_model is None:
        pytest.skip("lowbit.models is not importable")
    torch.manual_seed(0)
    model = build_model(name)
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(4, 1, 28, 28, generator=gen)]
    config = QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel", num_candidates=10),
        act=QuantSpec(bits=4, num_candidates=10),
        first_last_bits=8,
    )
    n_float = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in model.modules())
    lowbit.prepare(model, config, calib=calib)
    assert sum(isinstance(m, QuantLinear | QuantConv2d) for m in model.modules()) == n_float
    x = torch.randn(3, 1, 28, 28, generator=gen)
    model.train()
    model(x).sum().backward()
    int_model = lowbit.convert(model)
    with torch.no_grad():
        assert torch.equal(int_model(x), model.eval()(x))
