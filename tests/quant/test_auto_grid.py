"""``symmetric: auto``: each quantizer's grid chosen from its calibration data, kept through state dicts,
conversion and files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig, QuantSpec
from lowbit.errors import ConfigError
from lowbit.quant import functional as F
from lowbit.quant.calibrate import init_range
from lowbit.quant.quantizer import Quantizer
from lowbit.spec import AUTO_ASYMMETRIC_RATIO


def _best_error(x: torch.Tensor, bits: int, symmetric: bool, signed: bool) -> float:
    """Naive reference: the lowest MSE over the 100 shrunk min-max ranges of one grid."""
    qmin, qmax = F.int_range(bits, signed)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    best = float("inf")
    for k in range(1, 101):
        c = k / 100
        if symmetric:
            amax = max(hi, -lo) * c if qmin < 0 else hi * c
            s, z = amax / (qmax if qmax > 0 else -qmin), 0.0
        else:
            s = (hi - lo) * c / (qmax - qmin)
            z = min(max(qmin - round(lo * c / s), qmin), qmax)
        q = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
        best = min(best, float(((q - x) ** 2).mean()))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["relu", "gauss", "skewed"])
def test_choice_follows_the_errors(kind: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4000, generator=g)
    if kind == "relu":
        x = x.relu()
    elif kind == "skewed":  # GELU-like: a long positive tail, a short negative one
        x = torch.nn.functional.gelu(x * 3)
    q = Quantizer(QuantSpec(bits=4, symmetric="auto"))
    init_range(q, x)
    if kind == "relu":
        assert q.symmetric and not bool(q.signed) and q.zero_point is None
        return
    sym = _best_error(x, 4, True, True)
    asym = _best_error(x, 4, False, False)
    want_asym = asym < AUTO_ASYMMETRIC_RATIO * sym
    assert (not q.symmetric) == want_asym
    assert (q.zero_point is not None) == want_asym
    assert bool(q.signed) == (not want_asym)
    if kind == "skewed":
        assert want_asym  # the case the choice exists for
    if kind == "gauss":
        assert not want_asym
    # the quantizer's error is the chosen grid's best error
    err = float(((q(x).detach() - x) ** 2).mean())
    assert err == pytest.approx(asym if want_asym else sym, rel=1e-4)


def test_asymmetric_choice_learns_its_zero_point() -> None:
    q = Quantizer(QuantSpec(bits=3, symmetric="auto"))
    x = torch.nn.functional.gelu(torch.randn(2000, generator=torch.Generator().manual_seed(1)) * 3)
    init_range(q, x)
    assert isinstance(q.zero_point, nn.Parameter)
    names = {n for n, _ in q.named_parameters()}
    assert names == {"scale", "zero_point"}
    q(x).sum().backward()
    assert q.zero_point.grad is not None
    # fixed ranges: the zero point is a buffer
    q2 = Quantizer(QuantSpec(bits=3, symmetric="auto", learn_scale=False))
    init_range(q2, x)
    assert "zero_point" in dict(q2.named_buffers())


def test_state_dict_carries_the_choice_both_ways() -> None:
    skew = torch.nn.functional.gelu(torch.randn(2000, generator=torch.Generator().manual_seed(2)) * 3)
    a = Quantizer(QuantSpec(bits=4, symmetric="auto"))
    init_range(a, skew)
    assert not a.symmetric
    b = Quantizer(QuantSpec(bits=4, symmetric="auto"))
    init_range(b, torch.randn(2000))  # chose the symmetric signed grid
    assert b.symmetric
    b.load_state_dict(a.state_dict())
    assert not b.symmetric and torch.equal(b(skew), a(skew))
    c = Quantizer(QuantSpec(bits=4, symmetric="auto"))
    init_range(c, torch.randn(2000))
    a.load_state_dict(c.state_dict())  # and back: the zero point goes
    assert a.symmetric and a.zero_point is None and bool(a.signed)
    assert torch.equal(a(skew), c(skew))


def test_only_auto_quantizers_switch() -> None:
    with pytest.raises(ValueError, match="auto"):
        Quantizer(QuantSpec(bits=4)).use_grid(False, False)


@pytest.mark.parametrize("fields", [{"symmetric": "yes"}, {"symmetric": 1}, {"symmetric": "auto", "offset": "float16"}])
def test_spec_rejects(fields: dict) -> None:
    from lowbit.validate import build_dataclass

    with pytest.raises(ConfigError):
        build_dataclass(QuantSpec, fields, "quant.act")


@pytest.mark.parametrize(
    "fields, symmetric",
    [({"signed": True}, True), ({"format": "q4_0"}, True), ({"format": "q4_1"}, False),
     ({"bits": 1, "binary": {}}, True), ({"bits": 3}, "auto")],
)  # fmt: skip
def test_auto_resolves_where_other_fields_fix_the_grid(fields: dict, symmetric: object) -> None:
    """The recipe default (act: symmetric auto) merged with fields that fix the grid: no error, their grid."""
    from lowbit.validate import build_dataclass

    spec = build_dataclass(QuantSpec, fields, "quant.act", inherit_from=QuantSpec(bits=4, symmetric="auto"))
    assert spec.symmetric == symmetric and type(spec.symmetric) is type(symmetric)


def test_the_default_activation_grid_is_auto() -> None:
    assert QuantConfig().act.symmetric == "auto"


class _Skewed(nn.Module):
    """A GELU between two linears: the second one's input is skewed (asymmetric), the first one's is not."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x) * 3))


def test_prepare_convert_save_load_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    model = _Skewed()
    cfg = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=4, symmetric="auto"))
    qm = lowbit.prepare(model, cfg, calib=[x]).eval()
    assert qm.fc1.input_quantizer.symmetric and not qm.fc2.input_quantizer.symmetric
    int_model = lowbit.convert(qm)
    assert torch.equal(int_model(x), qm(x))
    path = lowbit.save(int_model, tmp_path / "m.safetensors")
    assert torch.equal(lowbit.load(path, model=_Skewed())(x), qm(x))
