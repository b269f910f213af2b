"""Oscillation tracking, dampening and freezing: the toy problem, exact tracking, freezing semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit import ConfigError
from lowbit.methods import build_methods
from lowbit.methods.oscillation import (
    OscillationDampening,
    OscillationFreezing,
    OscillationTracker,
    OscillationTracking,
    cosine_ramp,
    dampening_loss,
)

# Optimum of the toy regression: every element between two grid points of a 0.1 grid.
W_STAR = torch.tensor([0.13, -0.27, 0.34, 0.05, -0.11, 0.21, -0.36, 0.42])


def _toy_model(learn_scale: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    spec = lowbit.QuantSpec(bits=4, granularity="tensor", learn_scale=learn_scale)
    m = lowbit.prepare(nn.Sequential(nn.Linear(8, 1, bias=False)), lowbit.QuantConfig(weight=spec, act=None))
    with torch.no_grad():
        m[0].weight_quantizer.scale.fill_(0.1)
        m[0].weight.copy_(W_STAR.round(decimals=1).unsqueeze(0))
    return m


def _train_toy(method, steps: int = 400) -> tuple[int, int, OscillationTracker]:
    """Plain SGD + STE on ``min E[(x·w* − x·q(w))²]/2``; flips in the first and second half."""
    m = _toy_model()
    method.attach(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    tracker = m[0].weight_quantizer.int_transform
    flips = []
    for t in range(steps):
        x = torch.randn(64, 8, generator=g)
        loss = 0.5 * ((x @ W_STAR - m(x).squeeze(1)) ** 2).mean()
        extra = method.loss(m)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = int(tracker.oscillations)
        method.step(t + 1)
        flips.append(int(tracker.oscillations) - before)
    return sum(flips[: steps // 2]), sum(flips[steps // 2 :]), tracker


def test_toy_problem_oscillates_with_plain_ste() -> None:
    first, second, tracker = _train_toy(OscillationTracking(total_steps=400))
    assert second > 300, "with the STE the integers keep flipping around w*"
    assert float(tracker.freq.min()) > 0.05


def test_dampening_stops_the_flips() -> None:
    _, second, tracker = _train_toy(OscillationDampening(total_steps=400, lambda_final=5.0, aggregation="sum"))
    assert second <= 2
    assert not bool(tracker.frozen.any())


def test_freezing_stops_the_flips_and_freezes_every_oscillating_weight() -> None:
    _, second, tracker = _train_toy(OscillationFreezing(total_steps=400, threshold_final=0.02))
    assert second == 0
    assert bool(tracker.frozen.all())
    # each weight is frozen to one of the two grid points around its optimum
    frozen = tracker.frozen_int.flatten() * 0.1
    assert torch.all((frozen - W_STAR).abs() <= 0.1 + 1e-6)


def _naive_track(seq: list[list[int]], m: float) -> tuple[list[float], int]:
    """Reference: per element, an oscillation is a change opposite to the previous non-zero change."""
    n = len(seq[0])
    freq, last_dir, flips = [0.0] * n, [0] * n, 0
    for prev, cur in zip(seq, seq[1:], strict=False):
        for i in range(n):
            d = (cur[i] > prev[i]) - (cur[i] < prev[i])
            o = 1 if d * last_dir[i] == -1 else 0
            flips += o
            freq[i] = m * o + (1 - m) * freq[i]
            if d != 0:
                last_dir[i] = d
    return freq, flips


def test_tracker_on_a_hand_made_sequence() -> None:
    seq = [[0, 0, 3], [1, 0, 3], [0, 0, 2], [0, 1, 2], [1, 2, 3], [1, 1, 3], [0, 1, 2], [1, 1, 1]]
    t = OscillationTracker(torch.tensor(seq[0], dtype=torch.float32), momentum=0.1)
    flips = sum(t.update(torch.tensor(s, dtype=torch.float32), step) for step, s in enumerate(seq[1:], 1))
    ref, ref_flips = _naive_track(seq, 0.1)
    assert flips == ref_flips == 7
    assert torch.allclose(t.freq, torch.tensor(ref), atol=1e-7)
    # element 0 changes +,−,+,−,+ (4 oscillations), element 1 +,+,− (1), element 2 −,+,−,− (2)
    assert t.last_dir.tolist() == [1, -1, -1]


def test_tracker_matches_the_reference_on_random_walks() -> None:
    g = torch.Generator().manual_seed(3)
    steps = torch.randint(-1, 2, (60, 50), generator=g)
    seq = torch.cumsum(steps, 0).tolist()
    t = OscillationTracker(torch.tensor(seq[0], dtype=torch.float32), momentum=0.05)
    for step, s in enumerate(seq[1:], 1):
        t.update(torch.tensor(s, dtype=torch.float32), step)
    ref, ref_flips = _naive_track(seq, 0.05)
    assert int(t.oscillations) == ref_flips
    assert torch.allclose(t.freq, torch.tensor(ref), atol=1e-6)


def test_tracker_update_is_once_per_step() -> None:
    t = OscillationTracker(torch.zeros(3), momentum=0.5)
    t.update(torch.ones(3), 1)
    t.update(torch.zeros(3), 2)
    assert t.update(torch.ones(3), 2) == 0  # same step again: ignored
    assert torch.equal(t.prev_int, torch.zeros(3))


def test_forward_passes_eval_and_dampening_never_touch_the_tracker() -> None:
    m = _toy_model(learn_scale=True)
    method = OscillationDampening(total_steps=10, lambda_final=1.0, start=0.0)
    method.attach(m)
    method.t = 5
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(4, 8)
    with torch.no_grad():
        m[0].weight.add_(0.07)  # move weights: a forward-pass tracker would see changes
    m.train()
    m(x).sum().backward()
    method.loss(m).backward()
    m.eval()
    m(x)
    after = m.state_dict()
    for k in before:
        if "int_transform" in k:
            assert torch.equal(before[k], after[k]), k


def test_frozen_integers_stay_while_the_scale_moves() -> None:
    m = _toy_model(learn_scale=True)
    method = OscillationFreezing(total_steps=10)
    method.attach(m)
    q, w = m[0].weight_quantizer, m[0].weight
    t = q.int_transform
    with torch.no_grad():
        t.frozen[0, :3] = True
        t.frozen_int[0, :3] = torch.tensor([5.0, -7.0, 2.0])
    for scale in (0.1, 0.05, 0.3):
        with torch.no_grad():
            q.scale.fill_(scale)
        ints = q.to_int(w)
        assert ints[0, :3].tolist() == [5, -7, 2]
        assert torch.equal(ints[0, 3:], torch.clamp(torch.round(w[0, 3:] / scale), -8, 7).int())
    w.grad = q.scale.grad = None
    (q(w) * torch.linspace(1, 2, 8)).sum().backward()
    assert torch.all(w.grad[0, :3] == 0), "frozen latent weights get no task gradient"
    assert torch.all(w.grad[0, 3:] != 0)
    assert q.scale.grad is not None and float(q.scale.grad) != 0.0
    # convert sees the frozen integers
    iw = lowbit.convert(m)[0]
    assert iw.qweight.weight_int[0, :3].tolist() == [5, -7, 2]


def test_state_dict_round_trip_restores_tracking_and_freezing() -> None:
    method = OscillationFreezing(total_steps=200, threshold_final=0.02)
    _, _, _ = _train_toy(method, steps=200)
    trained = method.layers[0][1]
    fresh = _toy_model()
    OscillationFreezing(total_steps=200).attach(fresh)
    fresh[0].load_state_dict(trained.state_dict())
    a, b = trained.weight_quantizer.int_transform, fresh[0].weight_quantizer.int_transform
    for name, buf in a.named_buffers():
        assert torch.equal(buf, getattr(b, name)), name
    assert bool(b.frozen.any())
    moved = copy.deepcopy(fresh)[0]
    assert torch.equal(moved.weight_quantizer.to_int(moved.weight), trained.weight_quantizer.to_int(trained.weight))


def _naive_dampening(w: torch.Tensor, s: float, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(torch.round(w / s), qmin, qmax) * s
    return (q - torch.clamp(w, qmin * s, qmax * s)) ** 2


@pytest.mark.parametrize("aggregation", ["sum", "mean", "kernel_mean"])
def test_dampening_loss_equals_the_formula(aggregation: str) -> None:
    torch.manual_seed(0)
    conv = lowbit.prepare(
        nn.Sequential(nn.Conv2d(3, 6, 3)),
        lowbit.QuantConfig(weight=lowbit.QuantSpec(bits=3, granularity="tensor"), act=None),
    )[0]
    q = conv.weight_quantizer
    err = _naive_dampening(conv.weight.detach(), float(q.scale.detach()), -4, 3)
    expect = {"sum": err.sum(), "mean": err.mean(), "kernel_mean": err.sum(0).mean()}[aggregation]
    got = dampening_loss(conv.weight, q, aggregation)
    assert torch.allclose(got, expect, rtol=1e-5)
    got.backward()
    assert q.scale.grad is None, "dampening leaves range learning alone"
    w = conv.weight.detach()
    s = float(q.scale.detach())
    inside = (w >= -4 * s) & (w <= 3 * s)
    assert torch.all(conv.weight.grad[~inside] == 0)


def test_cosine_ramp() -> None:
    assert cosine_ramp(10, 100, 0.25, 0.1, 0.01, 0.0) == 0.0
    assert cosine_ramp(25, 100, 0.25, 0.1, 0.01, 0.0) == pytest.approx(0.1)
    assert cosine_ramp(62.5, 100, 0.25, 0.1, 0.01, 0.0) == pytest.approx(0.055)
    assert cosine_ramp(100, 100, 0.25, 0.1, 0.01, 0.0) == pytest.approx(0.01)
    assert cosine_ramp(500, 100, 0.25, 0.1, 0.01, 0.0) == pytest.approx(0.01)


def test_high_bit_layers_are_not_tracked_but_are_dampened() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = lowbit.QuantConfig(
        weight=lowbit.QuantSpec(bits=4),
        act=None,
        rules=[lowbit.Rule(match="2", weight=lowbit.QuantSpec(bits=8))],
    )
    lowbit.prepare(model, cfg)
    method = OscillationDampening(total_steps=10, start=0.0, lambda_start=1.0)
    method.attach(model)
    assert [name for name, *_ in method.layers] == ["0"]
    assert model[2].weight_quantizer.int_transform is None
    assert len(method.weights) == 2


def test_group_quantizers_are_tracked_in_their_view() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    spec = lowbit.QuantSpec(bits=3, granularity="group", group_size=8)
    lowbit.prepare(model, lowbit.QuantConfig(weight=spec, act=None))
    method = OscillationFreezing(total_steps=4, start=0.0, threshold_start=0.5, threshold_final=0.5)
    method.attach(model)
    tracker = model[0].weight_quantizer.int_transform
    assert tracker.freq.shape == (4, 2, 8)
    with torch.no_grad():
        tracker.frozen[1, 1, 3] = True
        tracker.frozen_int[1, 1, 3] = 3.0
    method.step(1)
    x = torch.randn(2, 16)
    assert torch.equal(lowbit.convert(model)(x), model.eval()(x))
    assert lowbit.convert(model)[0].qweight.weight_int[1, 11] == 3


def test_metrics_report_fractions_and_histograms() -> None:
    method = OscillationFreezing(total_steps=200, threshold_final=0.02)
    _train_toy(method, steps=200)
    row = method.metrics(None)["oscillation"]
    assert row["frozen"] == 1.0 and row["tracked"] == 8
    layer = row["layers"]["0"]
    assert sum(layer["hist"]) == 8 and len(layer["hist"]) == len(row["hist_edges"]) - 1


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"name": "oscillation_dampening", "aggregation": "median"}, "aggregation='median'"),
        ({"name": "oscillation_freezing", "momentum": 0}, "momentum=0"),
        ({"name": "oscillation_freezing", "threshold_start": 2}, "threshold_start=2"),
        ({"name": "oscillation_tracking", "max_bits": 9}, "max_bits=9"),
        ({"name": "oscillation_tracking", "speed": 9}, "speed"),
    ],
)
def test_bad_settings_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build_methods([spec], total_steps=10)


def test_methods_with_different_momenta_cannot_share_trackers() -> None:
    m = _toy_model()
    OscillationFreezing(total_steps=10, momentum=0.01).attach(m)
    with pytest.raises(ConfigError, match="momentum"):
        OscillationDampening(total_steps=10, momentum=0.02).attach(m)
    OscillationDampening(total_steps=10, momentum=0.01).attach(m)  # same momentum: shares the tracker
