"""Pure quantization math against PyTorch's own fake-quant kernels and naive references.

Oracles: ``torch.fake_quantize_per_{tensor,channel}_affine`` (bit-exact forward),
``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (LSQ/LSQ+ gradients), a float64 Python
reference of the LSQ formulas (METHODS.md §0), and Python's ``round`` (half to even) on dyadic inputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.quant import functional as F

BITS = list(range(1, 9))
GRIDS = [(b, signed) for b in BITS for signed in (True, False)]


def _f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (so a Python float scale means the same in every kernel)."""
    return torch.tensor(v, dtype=torch.float32).item()


def _zero_points(qmin: int, qmax: int) -> list[int]:
    return sorted({qmin, qmax, (qmin + qmax) // 2, min(max(0, qmin), qmax)})


def _naive_int(x: float, s: float, z: int, qmin: int, qmax: int) -> int:
    """clip(round(x/s) + z) in exact float64 arithmetic (valid for dyadic x and power-of-two s)."""
    return min(max(round(x / s) + z, qmin), qmax)


# -- int_range ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_int_range_invariants(bits: int, signed: bool) -> None:
    qmin, qmax = F.int_range(bits, signed)
    assert isinstance(qmin, int) and isinstance(qmax, int)
    assert qmax - qmin + 1 == 2**bits
    if signed:
        assert qmin == -(qmax + 1) and qmin < 0 <= qmax
    else:
        assert qmin == 0


def test_int_range_known_values() -> None:
    assert F.int_range(1, True) == (-1, 0)
    assert F.int_range(1, False) == (0, 1)
    assert F.int_range(4, True) == (-8, 7)
    assert F.int_range(8, False) == (0, 255)
    assert F.int_range(16, True) == (-32768, 32767)


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, 4.0, True, False, "4", None])
def test_int_range_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        F.int_range(bad, True)  # type: ignore[arg-type]


# -- forward: bit-exact against torch --------------------------------------------------------------


@pytest.mark.parametrize("bits,signed", GRIDS)
def test_fake_quantize_equals_torch_per_tensor(bits: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(bits * 2 + signed)
    qmin, qmax = F.int_range(bits, signed)
    for z in _zero_points(qmin, qmax):
        for _ in range(3):
            s = _f32(float(torch.empty(()).uniform_(0.005, 0.5, generator=gen)))
            x = torch.randn(257, generator=gen) * s * (qmax - qmin + 4) / 2
            ours = F.fake_quantize(x, torch.tensor(s), z, qmin, qmax)
            ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
            assert torch.equal(ours, ref), (bits, signed, z, s)
            # the tensor overload and a float scale give the same
            ref_t = torch.fake_quantize_per_tensor_affine(
                x, torch.tensor(s), torch.tensor(z, dtype=torch.int32), qmin, qmax
            )
            assert torch.equal(ref, ref_t)
            assert torch.equal(F.fake_quantize(x, s, float(z), qmin, qmax), ref)


@pytest.mark.parametrize("bits,signed", GRIDS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fake_quantize_equals_torch_per_channel(bits: int, signed: bool, axis: int) -> None:
    gen = torch.Generator().manual_seed(100 + bits * 6 + signed * 3 + axis)
    qmin, qmax = F.int_range(bits, signed)
    shape = [3, 5, 4]
    c = shape[axis]
    scale = torch.empty(c).uniform_(0.01, 0.4, generator=gen)
    zp = torch.randint(qmin, qmax + 1, (c,), generator=gen, dtype=torch.int32)
    x = torch.randn(*shape, generator=gen) * (qmax - qmin + 4) * 0.1
    bshape = [1, 1, 1]
    bshape[axis] = c
    ours = F.fake_quantize(x, scale.reshape(bshape), zp.float().reshape(bshape), qmin, qmax)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis, qmin, qmax)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("bits,signed", GRIDS)
def test_half_way_points_round_half_to_even(bits: int, signed: bool) -> None:
    """x = (k + 0.5) s with a power-of-two scale is exactly half way: the integer must be even."""
    qmin, qmax = F.int_range(bits, signed)
    for s in (0.25, 0.0625, 1.0, 2.0):
        for z in _zero_points(qmin, qmax):
            ks = range(qmin - z - 2, qmax - z + 2)
            xs = [(k + 0.5) * s for k in ks] + [k * s for k in ks]
            x = torch.tensor(xs, dtype=torch.float32)
            ints = F.quantize(x, s, z, qmin, qmax)
            expected = [_naive_int(v, s, z, qmin, qmax) for v in xs]
            assert ints.tolist() == expected
            for k, i in zip(ks, ints[: len(ks)].tolist(), strict=True):
                if qmin < i < qmax:  # not clipped: the half-way point went to the even neighbour
                    assert (i - z) % 2 == 0 and (i - z) in (k, k + 1)
            fq = F.fake_quantize(x, s, z, qmin, qmax)
            ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
            assert torch.equal(fq, ref)
            assert fq.tolist() == [(i - z) * s for i in expected]


def test_half_way_explicit() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5])
    assert F.quantize(x, 1.0, None, -8, 7).tolist() == [0, 2, 2, 0, -2, -2, 4]
    assert F.fake_quantize(x, 1.0, None, -8, 7).tolist() == [0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 4.0]


@pytest.mark.parametrize("bits,signed", GRIDS)
def test_dequantize_quantize_equals_fake_quantize(bits: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(7 * bits + signed)
    qmin, qmax = F.int_range(bits, signed)
    x = torch.randn(6, 40, generator=gen)
    for z in _zero_points(qmin, qmax):
        s = torch.empty(()).uniform_(0.01, 0.5, generator=gen)
        q = F.quantize(x, s, z, qmin, qmax)
        assert q.dtype == torch.int32
        assert torch.equal(F.dequantize(q, s, z), F.fake_quantize(x, s, z, qmin, qmax))
        # per channel, with per-channel zero points
        sc = torch.empty(6, 1).uniform_(0.01, 0.5, generator=gen)
        zc = torch.randint(qmin, qmax + 1, (6, 1), generator=gen).float()
        qc = F.quantize(x, sc, zc, qmin, qmax)
        assert torch.equal(F.dequantize(qc, sc, zc), F.fake_quantize(x, sc, zc, qmin, qmax))
        # the composed differentiable path gives the same integers
        assert torch.equal(F.quantize_ste(x, sc, zc, qmin, qmax), qc.float())


def test_zero_point_is_clamped_and_rounded_half_to_even() -> None:
    x = torch.linspace(-3, 3, 61)
    # z = 2.5 rounds to 2 (half to even), z = 100 clamps to qmax
    assert torch.equal(F.fake_quantize(x, 0.25, 2.5, -8, 7), F.fake_quantize(x, 0.25, 2, -8, 7))
    assert torch.equal(F.fake_quantize(x, 0.25, torch.tensor(100.0), -8, 7), F.fake_quantize(x, 0.25, 7, -8, 7))


# -- gradients ------------------------------------------------------------------------------------


def _lsq_reference(
    x: torch.Tensor, g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 LSQ/LSQ+: (dx, dscale, dzero_point, scale of the terms for a tolerance).

    The integers are taken in float32 exactly as the kernel takes them (x * (1/s)); the gradient
    formulas themselves are evaluated in float64.
    """
    xs32 = x * torch.reciprocal(s)
    r = torch.round(xs32).double()
    t = r + z.double()
    below, above = t < qmin, t > qmax
    inside = ~(below | above)
    xs = x.double() / s.double()
    term = torch.where(inside, r - xs, torch.where(below, qmin - z.double(), qmax - z.double()))
    dx = g.double() * inside
    ds = (g.double() * term).sum(dim=dims, keepdim=True)
    dz = (-s.double() * g.double() * (~inside)).sum(dim=dims, keepdim=True)
    mag = (g.double().abs() * (term.abs() + xs.abs() + 1)).sum(dim=dims, keepdim=True)
    return dx, ds, dz, mag


@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (3, False), (4, True), (8, True), (8, False)])
@pytest.mark.parametrize("zp", ["none", "mid", "max"])
def test_gradients_per_tensor(bits: int, signed: bool, zp: str) -> None:
    gen = torch.Generator().manual_seed(bits * 10 + signed)
    qmin, qmax = F.int_range(bits, signed)
    zval = {"none": 0, "mid": (qmin + qmax) // 2, "max": qmax}[zp]
    x = (torch.randn(500, generator=gen) * 0.3 * (qmax - qmin + 1)).requires_grad_()
    s = torch.tensor(0.21, requires_grad=True)
    z = torch.tensor(float(zval), requires_grad=True)
    g = torch.randn(500, generator=gen)
    y = F.fake_quantize(x, s, z if zp != "none" else None, qmin, qmax)
    y.backward(g)
    dx, ds, dz, mag = _lsq_reference(x.detach(), g, s.detach(), z.detach(), qmin, qmax, (0,))
    inside = dx != 0
    assert 0 < int(inside.sum()) < 500, "the test data should have both clipped and inside elements"
    assert torch.equal(x.grad, dx.float())  # exactly g * STE mask
    assert abs(s.grad.item() - ds.item()) <= 1e-5 * mag.item()
    if zp != "none":
        assert z.grad.item() == pytest.approx(dz.item(), rel=1e-5, abs=1e-6)
        # LSQ+: -s * sum(g over clipped elements)
        assert z.grad.item() == pytest.approx(-0.21 * g[~inside].sum().item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (4, False), (8, True)])
@pytest.mark.parametrize("axis", [0, 1])
def test_gradients_per_channel(bits: int, signed: bool, axis: int) -> None:
    gen = torch.Generator().manual_seed(bits * 3 + signed + 50 * axis)
    qmin, qmax = F.int_range(bits, signed)
    x = (torch.randn(6, 70, generator=gen) * 0.25 * (qmax - qmin + 1)).requires_grad_()
    c = x.shape[axis]
    bshape = (c, 1) if axis == 0 else (1, c)
    s = torch.empty(bshape).uniform_(0.1, 0.4, generator=gen).requires_grad_()
    z = torch.randint(qmin, qmax + 1, bshape, generator=gen).float().requires_grad_()
    g = torch.randn(6, 70, generator=gen)
    F.fake_quantize(x, s, z, qmin, qmax).backward(g)
    other = (1 - axis,)
    dx, ds, dz, mag = _lsq_reference(x.detach(), g, s.detach(), z.detach(), qmin, qmax, other)
    assert torch.equal(x.grad, dx.float())
    assert s.grad.shape == s.shape and z.grad.shape == z.shape
    assert torch.all((s.grad.double() - ds).abs() <= 1e-5 * mag)
    torch.testing.assert_close(z.grad.double(), dz, rtol=1e-5, atol=1e-6)


def test_fast_path_gradients_equal_composed_path() -> None:
    """fake_quantize (one node) and dequantize(quantize_ste(x)) (autograd through STE) agree."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 33, generator=gen) * 2
    s0 = torch.empty(8, 1).uniform_(0.1, 0.5, generator=gen)
    z0 = torch.randint(-3, 4, (8, 1), generator=gen).float()
    g = torch.randn(8, 33, generator=gen)
    grads = []
    for fast in (True, False):
        x, s, z = (t.clone().requires_grad_() for t in (x0, s0, z0))
        composed = (F.quantize_ste(x, s, z, -8, 7) - F.round_ste(z)) * s
        y = F.fake_quantize(x, s, z, -8, 7) if fast else composed
        y.backward(g)
        grads.append((y.detach(), x.grad, s.grad, z.grad))
    (y1, dx1, ds1, dz1), (y2, dx2, ds2, dz2) = grads
    assert torch.equal(y1, y2)
    assert torch.equal(dx1 != 0, dx2 != 0)  # the same STE mask, including elements exactly at qmin/qmax
    torch.testing.assert_close(dx1, dx2)  # the composed path multiplies by s * (1/s), not exactly 1
    torch.testing.assert_close(ds1, ds2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz1, dz2, rtol=1e-5, atol=1e-5)


def test_composed_path_full_gradient_at_grid_edges() -> None:
    """Elements that round exactly to qmin/qmax are inside: their STE gradient is 1, not 1/2."""
    x = torch.tensor([0.69, 0.7, -0.8, -0.79, 0.3, 2.0, -2.0], requires_grad=True)
    F.quantize_ste(x, 0.125, None, -8, 7).sum().backward()
    assert x.grad.tolist() == [8.0, 8.0, 8.0, 8.0, 8.0, 0.0, 0.0]


@pytest.mark.parametrize("zval", [0.0, 255.0, 17.0])
def test_zero_point_gradient_at_grid_edges(zval: float) -> None:
    """LSQ+ d/dz = -s per clipped element, also when z sits on qmin or qmax (common after a ReLU)."""
    z = torch.tensor(zval, requires_grad=True)
    x = torch.tensor([-1000.0, 1000.0, 0.0])  # one clipped below, one above, one inside
    F.fake_quantize(x, 0.5, z, 0, 255).sum().backward()
    assert z.grad.item() == -1.0
    z2 = torch.tensor(zval, requires_grad=True)
    (F.quantize_ste(x, 0.5, z2, 0, 255) - F.round_ste(z2)).mul(0.5).sum().backward()
    assert z2.grad.item() == -1.0


@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (4, False), (8, False)])
def test_gradients_match_torch_learnable_per_tensor(bits: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(bits + 20 * signed)
    qmin, qmax = F.int_range(bits, signed)
    x0 = torch.randn(300, generator=gen) * 0.3 * (qmax - qmin + 1) * 0.2
    g = torch.randn(300, generator=gen)
    zval = float((qmin + qmax) // 2 + 1)
    out = []
    for ours in (True, False):
        x = x0.clone().requires_grad_()
        s = torch.tensor([0.2], requires_grad=True)
        z = torch.tensor([zval], requires_grad=True)
        if ours:
            y = F.fake_quantize(x, s, z, qmin, qmax)
        else:
            y = torch._fake_quantize_learnable_per_tensor_affine(x, s, z, qmin, qmax, 1.0)
        y.backward(g)
        out.append((y.detach(), x.grad, s.grad, z.grad))
    (y1, dx1, ds1, dz1), (y2, dx2, ds2, dz2) = out
    assert torch.equal(y1, y2)
    assert torch.equal(dx1, dx2)
    torch.testing.assert_close(ds1, ds2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz1, dz2, rtol=1e-5, atol=1e-5)


def test_gradients_match_torch_learnable_per_channel() -> None:
    gen = torch.Generator().manual_seed(11)
    qmin, qmax = -8, 7
    x0 = torch.randn(5, 64, generator=gen) * 1.5
    g = torch.randn(5, 64, generator=gen)
    s0 = torch.empty(5).uniform_(0.1, 0.3, generator=gen)
    z0 = torch.tensor([0.0, 1.0, -2.0, 7.0, -8.0])
    out = []
    for ours in (True, False):
        x, s, z = (t.clone().requires_grad_() for t in (x0, s0, z0))
        if ours:
            y = F.fake_quantize(x, s[:, None], z[:, None], qmin, qmax)
        else:
            y = torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, qmin, qmax, 1.0)
        y.backward(g)
        out.append((y.detach(), x.grad, s.grad, z.grad))
    (y1, dx1, ds1, dz1), (y2, dx2, ds2, dz2) = out
    assert torch.equal(y1, y2)
    assert torch.equal(dx1, dx2)
    torch.testing.assert_close(ds1, ds2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz1, dz2, rtol=1e-5, atol=1e-5)


def test_no_scale_grad_requested() -> None:
    x = torch.randn(10, requires_grad=True)
    F.fake_quantize(x, torch.tensor(0.1), None, -8, 7).sum().backward()
    assert x.grad is not None


# -- hypothesis properties -----------------------------------------------------------------------


@st.composite
def _problems(draw: st.DrawFn) -> tuple[torch.Tensor, float, int, int, int]:
    bits = draw(st.integers(1, 8))
    signed = draw(st.booleans())
    qmin, qmax = F.int_range(bits, signed)
    z = draw(st.integers(qmin, qmax))
    s = _f32(draw(st.floats(1e-3, 10.0)))
    vals = draw(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=30)
    )
    return torch.tensor(vals, dtype=torch.float32), s, z, qmin, qmax


@settings(max_examples=150, deadline=None)
@given(_problems())
def test_property_integers_in_grid_and_torch_equal(p: tuple[torch.Tensor, float, int, int, int]) -> None:
    x, s, z, qmin, qmax = p
    q = F.quantize(x, s, z, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(F.fake_quantize(x, s, z, qmin, qmax), torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax))


@settings(max_examples=150, deadline=None)
@given(_problems())
def test_property_quantize_idempotent_on_grid(p: tuple[torch.Tensor, float, int, int, int]) -> None:
    x, s, z, qmin, qmax = p
    q = F.quantize(x, s, z, qmin, qmax)
    xq = F.dequantize(q, s, z)
    assert torch.equal(F.quantize(xq, s, z, qmin, qmax), q)
    assert torch.equal(F.fake_quantize(xq, s, z, qmin, qmax), xq)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.booleans())
def test_property_int_range(bits: int, signed: bool) -> None:
    qmin, qmax = F.int_range(bits, signed)
    assert qmax - qmin == 2**bits - 1
    assert qmin == (-(2 ** (bits - 1)) if signed else 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=20),
    st.floats(1e-3, 1e3),
)
def test_property_grad_scale_identity_forward(vals: list[float], factor: float) -> None:
    x = torch.tensor(vals, requires_grad=True)
    y = F.grad_scale(x, factor)
    assert torch.equal(y, x.detach())
    g = torch.linspace(-1, 1, len(vals))
    y.backward(g)
    torch.testing.assert_close(x.grad, g * factor)


# -- helpers ------------------------------------------------------------------------------------


def test_grad_scale_exact_values() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=gen).requires_grad_()
    for factor in (1 / 3, 0.1, 1e-3, 7.0, 1.0):
        assert torch.equal(F.grad_scale(x, factor), x.detach()), factor
    F.grad_scale(x, 0.25).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 0.25))


def test_positive_scale() -> None:
    s = torch.tensor(-0.5, requires_grad=True)
    p = F.positive_scale(s)
    assert p.item() == 0.5
    p.backward()
    assert s.grad.item() == -1.0
    # below the floor: value is the floor, gradient still flows
    t = torch.tensor([1e-12, -1e-12, 0.3], requires_grad=True)
    pt = F.positive_scale(t, eps=1e-8)
    assert pt.tolist() == pytest.approx([1e-8, 1e-8, 0.3])
    assert torch.all(pt > 0)
    pt.sum().backward()
    assert t.grad.tolist() == [1.0, -1.0, 1.0]


def test_round_ste_and_sign_ste() -> None:
    x = torch.tensor([-1.5, -0.5, 0.4, 0.5, 1.5, 2.5, 3.0], requires_grad=True)
    y = F.round_ste(x)
    assert y.tolist() == [-2.0, -0.0, 0.0, 0.0, 2.0, 2.0, 3.0]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    w = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    b = F.sign_ste(w)
    assert b.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    b.sum().backward()
    assert w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_lsq_grad_factor() -> None:
    assert F.lsq_grad_factor(100, 7) == pytest.approx(1 / (700**0.5))
    assert F.lsq_grad_factor(0, 7) == 1.0
