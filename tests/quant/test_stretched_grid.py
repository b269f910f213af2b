"""The stretched zero-free grid (ParetoQ's SEQ): levels (k + ½)·s, against a naive formula, through training
paths, LR-QAT and conversion to odd integers at half the scale."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec
from lowbit.errors import ConfigError
from lowbit.methods.lrqat import LowRankQuantLinear
from lowbit.quant import functional as F
from lowbit.quant.calibrate import init_range
from lowbit.quant.quantizer import Quantizer


def _naive(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """``s·(clip(round(w/s − ½), −2^(b−1), 2^(b−1)−1) + ½)`` by autograd through round_ste, per output row."""
    kmin, kmax = F.int_range(bits, True)
    s = s.reshape(-1, 1)
    return (F.round_ste(w / s - 0.5).clamp(kmin, kmax) + 0.5) * s


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_values_and_scale_gradient_match_the_formula(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(12, 40, generator=g)
    q = Quantizer(QuantSpec(bits=bits, stretched=True, granularity="channel", init="mse"), tuple(w.shape))
    init_range(q, w)
    y = q(w)
    halves = torch.round(2 * y.detach() / q.scale.detach().reshape(-1, 1))
    assert set(halves.unique().tolist()) <= set(range(-(2**bits) + 1, 2**bits, 2))  # odd multiples of s/2
    assert 0.0 not in y.detach().flatten().tolist()  # zero-free
    s = q.scale.detach().clone().requires_grad_(True)
    ref = _naive(w, s, bits)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-6)
    up = torch.randn(w.shape, generator=g)
    (y * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(q.scale.grad, s.grad, rtol=1e-5, atol=1e-5)


class _Identity(nn.Module):
    def forward(self, x_int: torch.Tensor, q: Quantizer) -> torch.Tensor:
        return x_int


def test_integer_path_equals_fast_path() -> None:
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    q = Quantizer(QuantSpec(bits=2, stretched=True, granularity="group", group_size=8), tuple(w.shape))
    init_range(q, w)
    fast = q(w)
    q.int_transform = _Identity()
    assert torch.equal(q(w), fast)
    assert set(q.to_int(w).unique().tolist()) <= {-2, -1, 0, 1}


def test_init_is_the_best_of_the_candidates() -> None:
    """Naive search: the scale with the lowest MSE among c·max|w|/(qmax + ½), c = k/100."""
    w = torch.randn(1, 500, generator=torch.Generator().manual_seed(3))
    q = Quantizer(QuantSpec(bits=2, stretched=True, init="mse"), tuple(w.shape))
    init_range(q, w)
    amax = float(w.abs().max())
    errs = [(float(((_naive(w, torch.tensor(k / 100 * amax / 1.5), 2) - w) ** 2).mean()), k) for k in range(1, 101)]
    best = min(errs)[1] / 100 * amax / 1.5
    assert float(q.scale.detach()) == pytest.approx(best, rel=1e-6)
    plain = Quantizer(QuantSpec(bits=2, init="mse"), tuple(w.shape))
    init_range(plain, w)
    with torch.no_grad():  # ParetoQ's point at 2 bits
        assert float(((q(w) - w) ** 2).mean()) < float(((plain(w) - w) ** 2).mean())


def test_set_bits_keeps_the_grid_span() -> None:
    """The stretched grid's cells span ±2^(b−1)·s (its levels are their centres): set_bits keeps that span."""
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    q = Quantizer(QuantSpec(bits=2, stretched=True, granularity="channel"), tuple(w.shape))
    init_range(q, w)
    span = q.scale.detach() * 2
    q.set_bits(3)
    torch.testing.assert_close(q.scale.detach() * 4, span)


def test_lrqat_backward_equals_autograd_and_merges_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    spec = QuantSpec(bits=2, stretched=True, granularity="group", group_size=32, init="lp")
    layers = [LowRankQuantLinear(lin, spec, rank=4, checkpoint=ck) for ck in (True, False)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(3, 64)
    grads = []
    for layer in layers:
        with torch.no_grad():
            layer.lora_a.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))  # some values clip
        layer(x).sin().sum().backward()
        grads.append([p.grad for p in layer.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    layer = layers[0]
    # step-0 integers are round-to-nearest of W0/s0 − ½ (Φ0 in fixed point: ties within its precision aside)
    assert torch.equal(layer.weight_int(), torch.round(layer.phi0_float() + layer.alpha / layer.rank
                                                         * (layer.lora_a @ layer.lora_b)).clamp(-2, 1))  # fmt: skip
    model = nn.Sequential(lin)
    qm = lowbit.prepare(copy.deepcopy(model), QuantConfig(weight=spec, act=None, lowrank=LowRankSpec(rank=4)))
    qm[0].load_state_dict(layer.state_dict())
    int_model = lowbit.convert(qm)
    qw = int_model[0].qweight
    assert qw.weight_bits == 3 and set(qw.weight_int.unique().tolist()) <= {-3, -1, 1, 3}
    assert torch.equal(int_model(x), qm(x))
    path = lowbit.save(int_model, tmp_path / "m.safetensors")
    assert torch.equal(lowbit.load(path, model=copy.deepcopy(model))(x), qm(x))


def test_quant_linear_converts_exactly() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    cfg = QuantConfig(weight=QuantSpec(bits=3, stretched=True, granularity="channel"), act=QuantSpec(bits=8))
    x = torch.randn(16, 32)
    qm = lowbit.prepare(model, cfg, calib=[x]).eval()
    int_model = lowbit.convert(qm)
    assert int_model[0].qweight.weight_bits == 4
    assert torch.equal(int_model(x), qm(x))


@pytest.mark.parametrize(
    "fields",
    [{"stretched": True, "bits": 1}, {"stretched": True, "symmetric": False}, {"stretched": True, "format": "q4_0"},
     {"stretched": True, "signed": False}, {"stretched": "yes"}],
)  # fmt: skip
def test_spec_rejects(fields: dict) -> None:
    from lowbit.validate import build_dataclass

    with pytest.raises(ConfigError):
        build_dataclass(QuantSpec, fields, "quant.weight")


def test_activations_cannot_be_stretched() -> None:
    with pytest.raises(ConfigError, match="weights only"):
        lowbit.prepare(nn.Sequential(nn.Linear(4, 4)), QuantConfig(act=QuantSpec(bits=2, stretched=True)),
                       calib=[torch.randn(2, 4)])  # fmt: skip
