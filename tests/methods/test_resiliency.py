"""Sung et al. 2015: the L2-optimal M-level step against a brute-force search, the alternation, the
quantizer integration (fixed step, [-L, L] integers, export) and a real retraining run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats
from torch import nn

import lowbit
from lowbit import ConfigError
from lowbit.checkpoint import load_checkpoint
from lowbit.config import recipe_from_dict
from lowbit.methods import METHODS, build_methods
from lowbit.methods.oscillation import OscillationTracker
from lowbit.methods.resiliency import (
    LevelClamp,
    Resiliency,
    _grid_start,
    alternate_step,
    l2_error,
    l2_optimal_step,
    level_quantize,
)
from lowbit.models import build_model
from lowbit.quant.calibrate import range_rows
from lowbit.run import run


def brute_force(w: np.ndarray, max_level: int) -> tuple[float, float]:
    """(min error, step): every interval between the points where some level changes, each minimised.

    Independent of the library: plain Python over the O(n·L) intervals, O(n) work each, float64.
    """
    a = np.abs(w.astype(np.float64))
    total = float((a**2).sum())
    edges = sorted({x / (k + 0.5) for x in a for k in range(max_level)}, reverse=True)
    best = (total, math.inf)
    for hi, lo in zip(edges, [*edges[1:], 0.0], strict=True):
        mid = (hi + lo) / 2
        z = np.minimum(np.floor(a / mid + 0.5), max_level)  # the levels inside this interval
        szz = float((z * z).sum())
        if szz == 0:
            continue
        d = min(max(float((a * z).sum()) / szz, lo), hi)
        e = total - 2 * d * float((a * z).sum()) + d * d * szz
        if e < best[0]:
            best = (e, d)
    return best


def _tensors(n_tensors: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_tensors):
        n = int(rng.integers(5, 160))
        kind = i % 3
        w = rng.standard_normal(n) if kind == 0 else rng.laplace(size=n) if kind == 1 else rng.uniform(-1, 1, n)
        out.append((w * rng.uniform(0.01, 3)).astype(np.float32))
    return out


@pytest.mark.parametrize("max_level", [1, 2, 3, 7])
def test_step_equals_the_brute_force_search(max_level: int) -> None:
    for w in _tensors(24, seed=max_level):
        ref_err, ref_step = brute_force(w, max_level)
        rows = torch.from_numpy(w)[None]
        step = l2_optimal_step(rows, max_level)
        err = float(l2_error(rows, step, max_level))
        assert err == pytest.approx(ref_err, rel=1e-5, abs=1e-9)
        assert float(step) == pytest.approx(ref_step, rel=1e-5)


def test_rows_are_solved_independently() -> None:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 50, generator=g) * torch.linspace(0.1, 2.0, 6)[:, None]
    together = l2_optimal_step(rows, 3)
    alone = torch.cat([l2_optimal_step(r[None], 3) for r in rows])
    assert torch.equal(together, alone)


def test_no_step_on_a_dense_grid_does_better() -> None:
    g = torch.Generator().manual_seed(1)
    for max_level in (1, 3):
        x = torch.randn(1, 3000, generator=g)
        step = l2_optimal_step(x, max_level)
        grid = torch.linspace(1e-3, 3.0, 20000)
        errs = torch.stack([l2_error(x, s.reshape(1), max_level) for s in grid])
        assert float(l2_error(x, step, max_level)) <= float(errs.min()) * (1 + 1e-7)


def test_alternation_never_raises_the_error_and_stops_at_a_fixed_point() -> None:
    g = torch.Generator().manual_seed(2)
    for max_level in (1, 3, 7):
        rows = torch.randn(4, 500, generator=g)
        step = torch.rand(4, generator=g) * 2 + 0.05
        errs = [l2_error(rows, step, max_level)]
        for _ in range(200):
            step, n = alternate_step(rows, step, max_level, max_iter=1)
            errs.append(l2_error(rows, step, max_level))
            if n == 0:
                break
        else:
            pytest.fail("the alternation did not stop in 200 refits")
        for before, after in zip(errs, errs[1:], strict=False):
            assert torch.all(after <= before * (1 + 1e-9))
        final, refits = alternate_step(rows, step, max_level)
        assert refits == 0 and torch.equal(final, step)
        z = torch.round(rows / step[:, None]).clamp(-max_level, max_level)
        refit = (rows.double() * z).sum(1) / (z.double() ** 2).sum(1)
        assert torch.allclose(step.double(), refit, rtol=1e-6)


def test_alternation_alone_can_stop_at_a_worse_local_minimum() -> None:
    """Why the exact search: from the best grid step the alternation sometimes misses the optimum."""
    worse = 0
    for w in _tensors(60, seed=11):
        rows = torch.from_numpy(w)[None]
        local, _ = alternate_step(rows, _grid_start(rows, 1), 1)
        exact = l2_optimal_step(rows, 1)
        e_local, e_exact = float(l2_error(rows, local, 1)), float(l2_error(rows, exact, 1))
        assert e_exact <= e_local * (1 + 1e-7)
        worse += e_local > e_exact * (1 + 1e-6)
    assert worse >= 1


def test_grid_fallback_reaches_a_fixed_point_near_the_optimum() -> None:
    x = torch.randn(2, 20000, generator=torch.Generator().manual_seed(3))
    exact = l2_optimal_step(x, 3)
    approx = l2_optimal_step(x, 3, exact_limit=0)
    assert alternate_step(x, approx, 3)[1] == 0
    assert torch.all(l2_error(x, approx, 3) <= l2_error(x, _grid_start(x, 3), 3))
    assert torch.allclose(l2_error(x, approx, 3), l2_error(x, exact, 3), rtol=1e-3)


def _gaussian_optimum(max_level: int) -> float:
    """The step minimising E|Q(x) - x|² for x ~ N(0, 1), by numerical integration (no sampling)."""

    def mse(d: float) -> float:
        e = integrate.quad(lambda x: x * x * stats.norm.pdf(x), 0, d / 2)[0]
        for k in range(1, max_level + 1):
            hi = (k + 0.5) * d if k < max_level else np.inf
            e += integrate.quad(lambda x, k=k: (x - k * d) ** 2 * stats.norm.pdf(x), (k - 0.5) * d, hi)[0]
        return 2 * e

    return float(optimize.minimize_scalar(mse, bounds=(0.05, 3.0), method="bounded").x)


@pytest.mark.parametrize("max_level", [1, 3])
def test_gaussian_weights_get_the_population_optimum(max_level: int) -> None:
    ref = _gaussian_optimum(max_level)
    if max_level == 1:
        assert ref == pytest.approx(1.224, abs=2e-3)  # Max (1960): the 3-level Gaussian quantizer, ±1.224σ
    x = torch.randn(1, 400_000, generator=torch.Generator().manual_seed(4)) * 0.05
    assert float(l2_optimal_step(x, max_level)) / 0.05 == pytest.approx(ref, rel=0.01)


# -- the method on a prepared model ------------------------------------------------------------------


def _prepared(bits: int = 2, **spec: object) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("mlp", width=24, depth=2)
    cfg = lowbit.QuantConfig(weight=lowbit.QuantSpec(bits=bits, **spec), act=lowbit.QuantSpec(bits=8))
    return lowbit.prepare(model, cfg, calib=[torch.randn(16, 1, 28, 28)])


def _weight_layers(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in lowbit.api.quantized_layers(model)]


@pytest.mark.parametrize(("bits", "levels", "max_level"), [(2, None, 1), (3, None, 3), (3, 5, 2), (4, 3, 1)])
def test_attach_sets_fixed_l2_steps_and_a_symmetric_grid(bits: int, levels: int | None, max_level: int) -> None:
    model = _prepared(bits, granularity="channel" if bits == 3 else "tensor")
    Resiliency(total_steps=1, levels=levels).attach(model)
    for layer in _weight_layers(model):
        q = layer.weight_quantizer
        assert isinstance(q.int_transform, LevelClamp) and int(q.int_transform.max_level) == max_level
        assert not q.scale.requires_grad and int(q.bits) == bits
        step = l2_optimal_step(range_rows(q, layer.weight), max_level)
        assert torch.equal(q.scale.reshape(-1), step)
        ints = q.to_int(layer.weight)
        assert int(ints.min()) >= -max_level and int(ints.max()) <= max_level
        assert int(ints.min()) == -max_level and int(ints.max()) == max_level  # the top levels are in use
        s = q.scale if q.scale.dim() == 0 else q.scale[:, None]
        assert torch.equal(q(layer.weight), level_quantize(layer.weight, s, max_level))


def test_retraining_updates_latent_weights_through_the_ste_but_never_the_step() -> None:
    model = _prepared(2)
    Resiliency(total_steps=1).attach(model)
    layer = _weight_layers(model)[1]
    q = layer.weight_quantizer
    g = torch.randn_like(layer.weight)
    (q(layer.weight) * g).sum().backward()
    inside = (layer.weight / q.scale).abs() <= 1.5  # round(|w|/Δ) <= 1: no clipping
    # dq/dw = s · (1/s): 1 up to rounding inside the grid, exactly 0 where clipped
    assert torch.allclose(layer.weight.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=1e-6, atol=0)
    assert torch.equal(layer.weight.grad == 0, ~inside | (g == 0))
    assert q.scale.grad is None
    weights, qparams = lowbit.train.split_parameters(model)
    assert all(p is not q.scale for p in weights + qparams)


def test_convert_and_export_write_ternary_codes(tmp_path: Path) -> None:
    model = _prepared(2).eval()
    Resiliency(total_steps=1).attach(model)
    x = torch.randn(8, 1, 28, 28)
    int_model = lowbit.convert(model)
    assert torch.equal(int_model(x), model(x))
    lowbit.save(int_model, tmp_path / "m.safetensors")
    loaded = lowbit.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded(x), model(x))
    for name, layer in lowbit.api.quantized_layers(loaded):
        codes = layer.qweight.weight_int
        assert layer.qweight.weight_bits == 2, name
        assert set(codes.unique().tolist()) == {-1, 0, 1}, name


def test_state_dict_round_trip() -> None:
    a, b = _prepared(3), _prepared(3)
    Resiliency(total_steps=1).attach(a)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1)
    Resiliency(total_steps=1).attach(b)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(a.eval()(x), b.eval()(x))


def test_bad_settings_are_config_errors() -> None:
    assert METHODS["resiliency"] is Resiliency
    with pytest.raises(ConfigError, match=r"levels=4 is not allowed: use null .* or an odd integer >= 3"):
        build_methods([{"name": "resiliency", "levels": 4}], total_steps=1)
    with pytest.raises(ConfigError, match=r"levels=7 does not fit layer 'features.1' at bits=2: allowed odd levels up"):
        Resiliency(total_steps=1, levels=7).attach(_prepared(2))
    with pytest.raises(ConfigError, match=r"bits=1, which holds no symmetric odd grid: use bits >= 2"):
        Resiliency(total_steps=1).attach(_prepared(1))
    with pytest.raises(ConfigError, match=r"asymmetric or unsigned weight grid: set quant.weight.symmetric=true"):
        Resiliency(total_steps=1).attach(_prepared(3, symmetric=False))
    model = _prepared(2)
    q = _weight_layers(model)[0].weight_quantizer
    q.int_transform = OscillationTracker(q.quantize_ste(_weight_layers(model)[0].weight), 0.01)
    with pytest.raises(ConfigError, match=r"already has an integer transform \(OscillationTracker\)"):
        Resiliency(total_steps=1).attach(model)
    with pytest.raises(ConfigError, match=r"unknown key 'methods\[0\]\.step_size'"):
        build_methods([{"name": "resiliency", "step_size": 1}], total_steps=1)


# -- a real run (on the synthetic dataset: no installed data needed) ---------------------------------


def test_run_reports_direct_and_retrained_accuracy_with_a_fixed_step(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        {
            "name": "res",
            "data": {"name": "synthetic", "train_subset": 1024, "test_subset": 500, "batch_size": 64},
            "model": {"name": "mlp", "args": {"width": 32, "depth": 2}},
            "pretrain": {"epochs": 2},
            "quant": {"weight": {"bits": 2}, "act": {"bits": 8, "learn_scale": False}, "first_last_bits": None},
            "qat": {"epochs": 2},
            "methods": [{"name": "resiliency"}],
        }
    )
    summary = run(recipe, tmp_path / "res", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()]
    direct = next(r for r in rows if r["stage"] == "direct")
    assert summary["direct_metric"] == direct["test_accuracy"]
    # ternary weights straight from a float model lose a lot; retraining wins most of it back
    assert summary["direct_metric"] < summary["float_metric"] - 5
    assert summary["quant_metric"] > summary["direct_metric"] + 5
    assert all(0.2 < r["zero_fraction"] < 0.8 for r in rows if r["stage"] == "qat")
    # the steps (per output channel: the recipe default) are the L2-optimal ones of the float weights,
    # unchanged by 2 epochs of retraining
    cache = next((tmp_path / ".cache").glob("float-mlp-*.safetensors"))
    float_state = load_checkpoint(cache)["model"]
    qat_state = load_checkpoint(tmp_path / "res" / "checkpoints" / "qat.safetensors")["model"]
    for name in ("features.1", "features.4", "classifier"):
        w = float_state[f"{name}.weight"]
        expected = l2_optimal_step(w.reshape(w.shape[0], -1), 1)
        assert torch.equal(qat_state[f"{name}.weight_quantizer.scale"], expected), name
        assert not torch.equal(qat_state[f"{name}.weight"], w), name  # the latent weights did train
    loaded = lowbit.load(tmp_path / "res" / "model.safetensors")
    for _, layer in lowbit.api.quantized_layers(loaded):
        assert set(layer.qweight.weight_int.unique().tolist()) <= {-1, 0, 1}
