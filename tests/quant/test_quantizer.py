"""The ``Quantizer`` module: granularities against naive loops, run-time bit changes, the integer slot,
state, and range initialisation (``lowbit.quant.calibrate``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.config import QuantSpec
from lowbit.quant import functional as F
from lowbit.quant.calibrate import init_range
from lowbit.quant.quantizer import Quantizer


def _weight(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ready(spec: QuantSpec, w: torch.Tensor) -> Quantizer:
    q = Quantizer(spec, tuple(w.shape))
    init_range(q, w)
    return q


class IdentityInt(nn.Module):
    def forward(self, x_int: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        return x_int


class FixInts(nn.Module):
    """Replaces the integers where ``mask`` is set by ``values`` (like weight freezing)."""

    def __init__(self, mask: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.register_buffer("values", values)

    def forward(self, x_int: torch.Tensor, quantizer: Quantizer) -> torch.Tensor:
        return torch.where(self.mask.reshape(x_int.shape), self.values.reshape(x_int.shape).float(), x_int)


def _scale(q: Quantizer) -> torch.Tensor:
    return F.positive_scale(q.scale).detach()


# -- granularities against naive references -------------------------------------------------------


def test_per_tensor_minmax_naive() -> None:
    w = _weight(6, 10)
    q = _ready(QuantSpec(bits=4, init="minmax"), w)
    assert q.scale.shape == ()
    s = w.abs().max() / 7
    assert q.scale.item() == pytest.approx(s.item(), rel=1e-6)
    ref = torch.fake_quantize_per_tensor_affine(w, q.scale.item(), 0, -8, 7)
    assert torch.equal(q(w), ref)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_linear_weight(axis: int) -> None:
    w = _weight(6, 10, seed=1)
    q = _ready(QuantSpec(bits=3, granularity="channel", axis=axis, init="minmax"), w)
    dim = axis % 2
    assert q.scale.shape == (w.shape[dim],)
    s = _scale(q)
    # each channel's scale is its own max|w| / qmax
    torch.testing.assert_close(s, w.abs().amax(dim=1 - dim) / 3)
    out = q(w)
    for c in range(w.shape[dim]):
        sl = w.select(dim, c)
        expected = F.fake_quantize(sl, s[c], None, -4, 3)
        assert torch.equal(out.select(dim, c), expected)
    ref = torch.fake_quantize_per_channel_affine(w, s, torch.zeros(w.shape[dim], dtype=torch.int32), dim, -4, 3)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "shape,group_size", [((4, 12), 4), ((3, 16), 8), ((4, 2, 3, 3), 6), ((3, 13), 4), ((2, 2, 3, 3), 7), ((2, 5), 8)]
)  # the last three have a ragged last group (5 of 13, 4 of 18, and one group of 5 for 8)
def test_per_group_naive_loop(shape: tuple[int, ...], group_size: int) -> None:
    w = _weight(*shape, seed=2)
    q = _ready(QuantSpec(bits=4, granularity="group", group_size=group_size, init="minmax"), w)
    rows, cols = shape[0], w[0].numel()
    groups = -(-cols // group_size)
    assert q.scale.shape == (rows, groups)
    s = _scale(q)
    out = q(w)
    assert out.shape == w.shape
    out = out.reshape(rows, cols)
    flat = w.reshape(rows, cols)
    for r in range(rows):
        for j in range(groups):
            seg = flat[r, j * group_size : (j + 1) * group_size]
            assert s[r, j].item() == pytest.approx(seg.abs().max().item() / 7, rel=1e-6)
            expected = F.fake_quantize(seg, s[r, j], None, -8, 7)
            assert torch.equal(out[r, j * group_size : (j + 1) * group_size], expected), (r, j)


def test_per_group_uses_its_own_scale() -> None:
    """One group with huge values must not coarsen the grid of its neighbours."""
    w = torch.full((2, 8), 0.1)
    w[0, :4] = 100.0
    q = _ready(QuantSpec(bits=4, granularity="group", group_size=4, init="minmax", signed=True), w)
    assert q.scale.flatten().tolist() == pytest.approx([100 / 7, 0.1 / 7, 0.1 / 7, 0.1 / 7])
    out = q(w)
    # a per-tensor or per-row scale of 100/7 would round 0.1 to 0; each group keeps its own
    torch.testing.assert_close(out, w)


@pytest.mark.parametrize("spec", [QuantSpec(bits=3, granularity="group", group_size=5, init="mse"),
                                  QuantSpec(bits=3, granularity="group", group_size=5, symmetric=False),
                                  QuantSpec(bits=2, granularity="group", group_size=5, stretched=True)])  # fmt: skip
def test_a_ragged_last_group_is_its_own_quantizer(spec: QuantSpec) -> None:
    """The padding of a ragged group changes nothing: its scale, values and gradients are those of a
    per-channel quantizer of the ragged slice alone."""
    w = _weight(3, 12, seed=7)
    q = _ready(spec, w)
    alone = _ready(spec.replace(granularity="channel", group_size=None), w[:, 10:].contiguous())
    torch.testing.assert_close(q.scale.detach()[:, 2], alone.scale.detach(), rtol=0, atol=0)
    wq, wa = w.clone().requires_grad_(True), w[:, 10:].clone().requires_grad_(True)
    out, ref = q(wq), alone(wa)
    assert torch.equal(out[:, 10:], ref)
    up = torch.randn(3, 12, generator=torch.Generator().manual_seed(8))
    (out * up).sum().backward()
    (ref * up[:, 10:]).sum().backward()
    torch.testing.assert_close(wq.grad[:, 10:], wa.grad)
    torch.testing.assert_close(q.scale.grad[:, 2], alone.scale.grad)


def test_group_needs_shape() -> None:
    with pytest.raises(ValueError, match="group"):
        Quantizer(QuantSpec(bits=4, granularity="group", group_size=4), None)


def test_per_channel_activation_channels_on_dim_1() -> None:
    x = _weight(2, 3, 4, 4, seed=3)
    q = Quantizer(QuantSpec(bits=8, granularity="channel", signed=True, init="minmax"), None, channels=3)
    init_range(q, x.movedim(1, 0).reshape(3, -1).movedim(0, 1))
    s = _scale(q)
    torch.testing.assert_close(s, x.abs().amax(dim=(0, 2, 3)) / 127)
    ref = torch.fake_quantize_per_channel_affine(x, s, torch.zeros(3, dtype=torch.int32), 1, -128, 127)
    assert torch.equal(q(x), ref)


# -- bits at run time, state -------------------------------------------------------------------------


def test_set_bits_changes_grid_without_new_modules() -> None:
    w = _weight(8, 16, seed=4)
    q = _ready(QuantSpec(bits=4, granularity="channel", init="minmax"), w)
    modules_before = list(q.modules())
    params_before = [id(p) for p in q.parameters()]
    q.set_bits(2)
    assert int(q.bits) == 2
    assert q.int_grid() == (-2, 1)
    ints = q.to_int(w)
    assert int(ints.min()) >= -2 and int(ints.max()) <= 1
    assert len(torch.unique(q(w)[0])) <= 4
    assert list(q.modules()) == modules_before
    assert [id(p) for p in q.parameters()] == params_before
    with pytest.raises(ValueError, match="bits"):
        q.set_bits(9)
    with pytest.raises(ValueError, match="bits"):
        q.set_bits(0)


def test_cached_grid_follows_every_way_bits_can_change() -> None:
    """``int_grid`` is cached (no device sync per call) but never stale: in-place writes, load_state_dict, ``.to``."""
    w = _weight(8, 16, seed=4)
    q = _ready(QuantSpec(bits=4, granularity="channel", init="minmax"), w)
    assert q.int_grid() == (-8, 7) and q.nbits == 4
    q.set_bits(3)
    assert q.int_grid() == (-4, 3) and q.nbits == 3
    q.bits.fill_(5)
    assert q.int_grid() == (-16, 15)
    other = Quantizer(QuantSpec(bits=2, granularity="channel", signed=False, init="minmax"), tuple(w.shape))
    assert other.int_grid() == (0, 3) and other.nbits == 2
    other.load_state_dict(q.state_dict())
    assert other.int_grid() == (-16, 15) and other.nbits == 5
    q.to(torch.float64)  # buffers replaced by new tensors (same for a device move)
    q.bits.fill_(2)
    assert q.int_grid() == (-2, 1) and q.nbits == 2


def test_state_dict_round_trip_keeps_bits_and_scale() -> None:
    spec = QuantSpec(bits=4, granularity="channel", symmetric=False, init="minmax")
    w = _weight(8, 16, seed=5)
    q = _ready(spec, w)
    q.set_bits(3)
    fresh = Quantizer(spec, tuple(w.shape))
    assert int(fresh.bits) == 4
    fresh.load_state_dict(q.state_dict())
    assert int(fresh.bits) == 3 and bool(fresh.initialized)
    assert torch.equal(fresh(w), q(w))
    assert torch.equal(fresh.to_int(w), q.to_int(w))
    assert set(q.state_dict()) == {"bits", "signed", "initialized", "scale", "zero_point"}


def test_learn_scale_false_makes_buffers() -> None:
    q = Quantizer(QuantSpec(bits=4, learn_scale=False, symmetric=False), (4, 4))
    assert list(q.parameters()) == []
    names = dict(q.named_buffers())
    assert "scale" in names and "zero_point" in names


def test_asymmetric_has_zero_point_parameter() -> None:
    q = Quantizer(QuantSpec(bits=4, symmetric=False, granularity="channel"), (5, 4))
    assert isinstance(q.zero_point, nn.Parameter) and q.zero_point.shape == (5,)
    assert {n for n, _ in q.named_parameters()} == {"scale", "zero_point"}
    fixed_z = Quantizer(QuantSpec(bits=4, symmetric=False, learn_zero_point=False), (5, 4))
    assert not isinstance(fixed_z.zero_point, nn.Parameter)
    assert {n for n, _ in fixed_z.named_parameters()} == {"scale"}
    sym = Quantizer(QuantSpec(bits=4), (5, 4))
    assert sym.zero_point is None


# -- the integer slot ---------------------------------------------------------------------------------

SPECS = [
    QuantSpec(bits=4, init="minmax"),
    QuantSpec(bits=2, granularity="channel", init="minmax"),
    QuantSpec(bits=3, granularity="channel", axis=1, symmetric=False, init="minmax"),
    QuantSpec(bits=4, granularity="group", group_size=4, init="mse", num_candidates=20),
    QuantSpec(bits=8, granularity="group", group_size=8, symmetric=False, init="minmax"),
    QuantSpec(bits=1, granularity="channel", init="minmax"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_integer_path_equals_fast_path(spec: QuantSpec) -> None:
    w0 = _weight(6, 16, seed=6) * 0.7
    g = _weight(6, 16, seed=7)
    results = []
    for transform in (None, IdentityInt()):
        torch.manual_seed(0)
        q = _ready(spec, w0)
        if q.zero_point is not None:
            with torch.no_grad():
                q.zero_point.add_(0.3)  # a non-integer zero point: both paths must round it the same way
        q.int_transform = transform
        w = w0.clone().requires_grad_()
        y = q(w)
        y.backward(g)
        params = {n: p.grad.clone() for n, p in q.named_parameters()}
        results.append((y.detach(), w.grad, params, q.to_int(w0)))
    (y1, dw1, p1, i1), (y2, dw2, p2, i2) = results
    assert torch.equal(y1, y2)
    assert torch.equal(i1, i2)
    assert torch.equal(dw1 != 0, dw2 != 0)
    torch.testing.assert_close(dw1, dw2)
    assert p1.keys() == p2.keys()
    for n in p1:
        torch.testing.assert_close(p1[n], p2[n], rtol=1e-4, atol=1e-5, msg=n)
    assert i1.dtype == torch.int32


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_to_int_dequantizes_to_forward(spec: QuantSpec) -> None:
    w = _weight(6, 16, seed=8)
    q = _ready(spec, w)
    ints = q.to_int(w)
    qmin, qmax = q.int_grid()
    assert ints.dtype == torch.int32 and ints.shape == w.shape
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax
    s, z = q.export_qparams()
    sb = q._broadcast(s, w)
    deq = (q.view(ints.float()) - q._broadcast(z, w)) * sb if z is not None else q.view(ints.float()) * sb
    assert torch.equal(deq.reshape(w.shape), q(w))


def test_int_transform_fixing_integers() -> None:
    w = _weight(4, 8, seed=9)
    q = _ready(QuantSpec(bits=4, granularity="channel", init="minmax"), w)
    free = q.to_int(w)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, :3] = True
    mask[2, 5] = True
    values = torch.full((4, 8), -8, dtype=torch.int32)
    values[2, 5] = 7
    q.int_transform = FixInts(mask, values)
    ints = q.to_int(w)
    assert torch.equal(ints[mask], values[mask])
    assert torch.equal(ints[~mask], free[~mask])
    s = _scale(q)
    assert torch.equal(q(w), ints.float() * s[:, None])
    assert "int_transform.mask" in q.state_dict()


# -- LSQ gradient scaling -----------------------------------------------------------------------------


def test_grad_scale_only_changes_the_scale_gradient() -> None:
    w = _weight(6, 16, seed=10)
    outs = []
    for gs in (False, True):
        q = _ready(QuantSpec(bits=4, granularity="channel", grad_scale=gs, init="minmax"), w)
        q.train()
        y = q(w)
        y.sum().backward()
        q.eval()
        assert torch.equal(q(w), y.detach())  # train and eval forward are identical
        outs.append((y.detach(), q.scale.grad.clone()))
    (y1, g1), (y2, g2) = outs
    assert torch.equal(y1, y2)
    factor = F.lsq_grad_factor(16, 7)
    torch.testing.assert_close(g2, g1 * factor)


# -- range initialisation -----------------------------------------------------------------------------


def test_minmax_known_values() -> None:
    w = torch.tensor([[-3.5, 1.0, 0.25, 2.0]])
    q = _ready(QuantSpec(bits=4, init="minmax"), w)
    assert q.scale.item() == 0.5
    assert q(w).tolist() == [[-3.5, 1.0, 0.0, 2.0]]  # 0.25 / 0.5 = 0.5 rounds to 0 (half to even)
    # asymmetric: range [-1, 3] on the unsigned 4-bit grid
    x = torch.tensor([[-1.0, 0.0, 3.0, 1.0]])
    qa = _ready(QuantSpec(bits=4, symmetric=False, init="minmax"), x)
    assert not bool(qa.signed)
    assert qa.scale.item() == pytest.approx(4 / 15)
    assert qa.zero_point.item() == 4.0  # 0 - round(-1 / (4/15)) = round(3.75)
    assert qa.to_int(x).tolist() == [[0, 4, 15, 8]]
    # symmetric with signed=None: non-negative data choose the unsigned grid
    r = torch.tensor([[0.0, 1.0, 3.0, 7.5]])
    qu = _ready(QuantSpec(bits=4, init="minmax"), r)
    assert not bool(qu.signed) and qu.scale.item() == pytest.approx(0.5)
    qs = _ready(QuantSpec(bits=4, init="minmax", signed=True), r)
    assert bool(qs.signed) and qs.scale.item() == pytest.approx(7.5 / 7)


def test_minmax_all_zero_rows_do_not_divide_by_zero() -> None:
    w = torch.zeros(3, 4)
    w[1] = 1.0
    q = _ready(QuantSpec(bits=4, granularity="channel", init="minmax"), w)
    assert torch.all(torch.isfinite(q(w)))
    assert torch.equal(q(w), w)


def _err(q: Quantizer, w: torch.Tensor, p: float) -> float:
    with torch.no_grad():
        return (q(w) - w).abs().pow(p).mean().item()


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_search_init_beats_minmax(granularity: str, symmetric: bool, bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    # heavy tails: Student-t with 2 degrees of freedom, from a seeded generator
    normal = torch.randn(8, 64, generator=gen)
    chi = torch.randn(8, 64, 2, generator=gen).pow(2).mean(-1)
    w = normal / chi.sqrt()
    base = QuantSpec(bits=bits, granularity=granularity, symmetric=symmetric, init="minmax")
    e_minmax2 = _err(_ready(base, w), w, 2.0)
    e_minmax4 = _err(_ready(base, w), w, 4.0)
    e_mse = _err(_ready(base.replace(init="mse", num_candidates=50), w), w, 2.0)
    e_lp = _err(_ready(base.replace(init="lp", p=4.0, num_candidates=50), w), w, 4.0)
    assert e_mse <= e_minmax2
    assert e_lp <= e_minmax4
    # on heavy-tailed data clipping pays off
    assert e_mse < e_minmax2 and e_lp < e_minmax4


def test_mse_init_per_row_is_optimal_over_candidates() -> None:
    """A brute-force search over the same candidates gives the same per-channel scale."""
    w = _weight(3, 50, seed=11) ** 3
    n = 25
    q = _ready(QuantSpec(bits=3, granularity="channel", init="mse", num_candidates=n, signed=True), w)
    for r in range(3):
        amax = w[r].abs().max()
        errs = []
        for k in range(1, n + 1):
            s = (amax * (k / n) / 3).clamp_min(1e-8)
            errs.append(((F.fake_quantize(w[r], s, None, -4, 3) - w[r]) ** 2).mean().item())
        best = min(range(n), key=lambda i: errs[i])
        assert q.scale[r].item() == pytest.approx((amax * ((best + 1) / n) / 3).item(), rel=1e-6)


# -- hypothesis: fast path == integer path for random shapes and specs ---------------------------------


@settings(max_examples=25, deadline=None)
@given(
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
    gran=st.sampled_from(["tensor", "channel", "group"]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    gsize=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_property_paths_agree(
    bits: int, symmetric: bool, gran: str, rows: int, groups: int, gsize: int, seed: int
) -> None:
    w = _weight(rows, groups * gsize, seed=seed)
    spec = QuantSpec(
        bits=bits,
        symmetric=symmetric,
        granularity=gran,
        group_size=gsize if gran == "group" else None,
        init="minmax",
    )
    q = _ready(spec, w)
    fast = q(w)
    ints = q.to_int(w)
    qmin, qmax = q.int_grid()
    assert int(ints.min()) >= qmin and int(ints.max()) <= qmax
    q.int_transform = IdentityInt()
    assert torch.equal(q(w), fast)
    assert torch.equal(q.to_int(w), ints)
    # idempotent: quantizing the quantized weight gives the same integers
    assert torch.equal(q.to_int(fast), ints)
