"""QBitOpt as a method: sensitivities against naive references, budgets against the model itself,
allocations in metrics and the report, resume equality, hostile state. The solvers: test_qbitopt_solve.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantConfig, QuantSpec, recipe_from_dict
from lowbit.errors import ConfigError, FormatError
from lowbit.methods import METHODS, attach_methods, build_methods, call_hooks
from lowbit.methods.qbitopt import QBitOpt, per_scale
from lowbit.quant.modules import quantized_layers
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.size import payload_bytes
from lowbit.run import run

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _prepared(seed: int = 0, granularity: str = "channel", act: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    group = 8 if granularity == "group" else None
    cfg = QuantConfig(weight=QuantSpec(bits=4, granularity=granularity, group_size=group, init="minmax"),
                      act=QuantSpec(bits=8, init="minmax") if act else None, first_last_bits=8)  # fmt: skip
    return lowbit.prepare(Net(), cfg, calib=[b[0] for b in _batches(2)])


def _loss(model: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(b[0]), b[1])


def _train(model: nn.Module, settings: dict[str, Any], steps: int, seed: int = 1) -> QBitOpt:
    """The loop's calls in the loop's order, on fixed batches."""
    (method,) = build_methods([{"name": "qbitopt", **settings}], total_steps=steps)
    attach_methods([method], model)
    data = _batches(steps + 16, seed)
    call_hooks([method], "start", model, lambda s: (_loss(model, b) for b in data[s:]), 0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    model.train()
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        _loss(model, data[step - 1]).backward()
        opt.step()
        method.step(step)
    return method


def test_registered_under_its_recipe_name() -> None:
    assert METHODS["qbitopt"] is QBitOpt


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_per_scale_sums_exactly_the_elements_that_share_a_scale(granularity: str) -> None:
    spec = QuantSpec(bits=4, granularity=granularity, group_size=4 if granularity == "group" else None)
    shape = (6, 3, 2, 2)
    q = Quantizer(spec, shape)
    t = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    got = per_scale(q, t)
    assert got.shape == q.scale.shape
    ref = torch.zeros(q.scale.shape)
    flat = t.reshape(6, -1)
    for row in range(6):
        for col in range(12):
            idx = () if granularity == "tensor" else (row,) if granularity == "channel" else (row, col // 4)
            ref[idx] += flat[row, col]
    torch.testing.assert_close(got, ref)


def test_fisher_is_the_ema_of_squared_latent_weight_gradients() -> None:
    """A naive reference: the same training with autograd's .grad read after every step."""
    steps, m = 6, 0.3
    model, ref_model = _prepared(), _prepared()
    ref_model.load_state_dict(model.state_dict())
    method = _train(model, {"average_bits": 4, "tau": 0, "momentum": m}, steps)
    data = _batches(steps + 16, 1)
    opt = torch.optim.SGD([p for p in ref_model.parameters() if p.requires_grad], lr=0.02)
    ref_model.train()
    ema: dict[str, torch.Tensor] = {}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(ref_model, data[step]).backward()
        for name, layer in quantized_layers(ref_model):
            sq = per_scale(layer.weight_quantizer, layer.weight.grad.square())
            ema[name] = sq.clone() if step == 0 else (1 - m) * ema[name] + m * sq
        opt.step()
    assert method.ema_updates == steps
    for name, f in method.fisher.items():
        torch.testing.assert_close(f, ema[name], rtol=1e-5, atol=0)


def test_hutchinson_is_exact_where_the_hessian_is_diagonal() -> None:
    """loss = ½‖Ŵ·e_b‖² summed over the basis inputs = ½‖Ŵ‖²: through the STE the Hessian w.r.t. the
    latent weight is diag(inside), so every Rademacher probe returns the unclipped weights per channel."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(12, 6, bias=False), nn.Linear(6, 6, bias=False), nn.Linear(6, 3, bias=False))
    cfg = QuantConfig(weight=QuantSpec(bits=3, granularity="channel", init="minmax"), act=None)
    model = lowbit.prepare(lin, cfg)
    with torch.no_grad():
        model[1].weight_quantizer.scale.mul_(0.5)  # clip some weights of the middle layer

    def loss() -> torch.Tensor:
        return sum(0.5 * m.quantized_weight().square().sum() for m in model)  # type: ignore[misc]

    (method,) = build_methods([{"name": "qbitopt", "average_bits": 3, "sensitivity": "hutchinson",
                                "probe_batches": 3, "pin_first_last": False, "tau": 1}], total_steps=4)  # fmt: skip
    attach_methods([method], model)
    call_hooks([method], "start", model, lambda s: (loss() for _ in range(100)), 0)
    traces = method._hutchinson(1)
    for name, layer in quantized_layers(model):
        q = layer.weight_quantizer
        qmin, qmax = q.int_grid()
        t = layer.weight.detach() / q.scale.detach()[:, None]
        inside = ((t.round() >= qmin) & (t.round() <= qmax)).float()
        torch.testing.assert_close(traces[name], inside.sum(1), rtol=0, atol=1e-5)
    assert float(traces["1"].sum()) < model[1].weight.numel()  # the clipped weights count for nothing


def test_lrqat_reports_the_gradient_of_its_dequantized_weight_on_both_paths() -> None:
    from lowbit.config import LowRankSpec

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 16)
    grads = []
    for recompute in (True, False):
        cfg = QuantConfig(weight=QuantSpec(bits=4, granularity="group", group_size=8, init="minmax"), act=None,
                          lowrank=LowRankSpec(rank=2, recompute=recompute))  # fmt: skip
        model = lowbit.prepare(copy.deepcopy(base), cfg)
        seen: list[torch.Tensor] = []
        model[0].watch_weight_grad(lambda g, seen=seen: seen.append(g.detach().clone()))
        w = model[0].quantized_weight().detach().requires_grad_(True)
        ref = torch.autograd.grad(model[2](torch.relu(nn.functional.linear(x, w, model[0].bias))).square().sum(), w)[0]
        model(x).square().sum().backward()
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], ref)
        grads.append(seen[0])
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", ["average_bits", "max_bytes", "max_bops"])
@pytest.mark.parametrize("solver", ["relaxed", "exact"])
def test_every_allocation_meets_the_budget_measured_on_the_model(budget: str, solver: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = _prepared(seed)
    limit = {"average_bits": float(rng.uniform(2.2, 5.0)),
             "max_bytes": int(payload_bytes(model) * rng.uniform(0.6, 0.9)),
             "max_bops": float(rng.uniform(1.2e7, 2.5e7))}[budget]  # fmt: skip
    method = _train(model, {budget: limit, "solver": solver, "tau": 2, "freeze": 0.0}, steps=8, seed=seed)
    assert [a["step"] for a in method.history] == [0, 2, 4, 6]
    for a in method.history:
        assert a["met"] and a["used"] <= limit * (1 + 1e-9)
    free = [n for (n, _), p in zip(method.layers, method.pinned, strict=True) if p is None]
    bits = {n: m.weight_quantizer.nbits for n, m in method.layers}
    assert bits == method.history[-1]["bits"] and bits["conv1"] == 8 and bits["fc3"] == 8  # pinned first/last
    if budget == "average_bits":
        n = {name: m.weight.numel() for name, m in method.layers}
        assert sum(n[f] * bits[f] for f in free) <= limit * sum(n[f] for f in free) * (1 + 1e-12)
    elif budget == "max_bytes":
        assert payload_bytes(model) <= limit


def test_the_exact_solver_never_does_worse_than_the_relaxation() -> None:
    for seed in range(3):
        a = _train(_prepared(seed), {"average_bits": 2.7, "solver": "relaxed", "tau": 4, "freeze": 0.0}, 4, seed)
        b = _train(_prepared(seed), {"average_bits": 2.7, "solver": "exact", "tau": 4, "freeze": 0.0}, 4, seed)
        c = np.array(list(a.history[-1]["sensitivity"].values()))
        assert np.allclose(c, list(b.history[-1]["sensitivity"].values()))
        assert b.history[-1]["objective"] <= a.history[-1]["objective"] * (1 + 1e-9)


def test_an_infeasible_budget_names_the_smallest_feasible_value() -> None:
    with pytest.raises(ConfigError, match=r"average_bits=1\.5 is infeasible: the smallest feasible value is 2 "):
        _train(_prepared(), {"average_bits": 1.5}, steps=1)
    model = _prepared()
    with pytest.raises(ConfigError, match="max_bytes=1000 is infeasible") as err:
        _train(model, {"max_bytes": 1000}, steps=1)
    smallest = int(str(err.value).split("smallest feasible value is ")[1].split()[0])
    method = _train(_prepared(), {"max_bytes": smallest, "tau": 1}, steps=2)  # exactly the smallest fits
    assert all(a["met"] for a in method.history)
    assert set(method.history[-1]["bits"].values()) == {2, 8}


def test_uniform_start_and_one_shot_start() -> None:
    m = _train(_prepared(), {"average_bits": 3, "tau": 0}, steps=3)
    assert len(m.history) == 1 and m.history[0]["source"] == "init:uniform"
    assert set(m.history[0]["bits"].values()) == {3, 8}  # uniform at the target, pins at 8
    m = _train(_prepared(), {"average_bits": 2.5, "tau": 0}, steps=3)  # no uniform width: 2, then the fill
    bits, n = m.history[0]["bits"], {name: layer.weight.numel() for name, layer in m.layers}
    free = [name for (name, _), p in zip(m.layers, m.pinned, strict=True) if p is None]
    spent = sum(n[f] * bits[f] for f in free)
    assert min(bits[f] for f in free) == 2 and spent <= 2.5 * sum(n[f] for f in free)
    steps = {2: 1, 3: 1, 4: 1, 5: 1, 6: 2}  # to the next candidate of (2, 3, 4, 5, 6, 8)
    assert all(spent + n[f] * steps[bits[f]] > 2.5 * sum(n[f] for f in free) for f in free if bits[f] < 8)  # full
    m = _train(_prepared(), {"average_bits": 3, "tau": 0, "init": "sensitivity", "probe_batches": 2}, steps=3)
    assert len(m.history) == 1 and m.history[0]["source"] == "init:sensitivity"


def test_reallocation_stops_for_the_frozen_end_and_pins_hold() -> None:
    m = _train(_prepared(), {"average_bits": 3, "tau": 2, "freeze": 0.5, "pin": {"fc2": 6}}, steps=10)
    assert [a["step"] for a in m.history] == [0, 2, 4]
    assert all(a["bits"]["fc2"] == 6 for a in m.history) and "fc2" not in m.history[-1]["sensitivity"]


@pytest.mark.parametrize("settings, match", [
    ({}, "exactly one budget"),
    ({"average_bits": 3, "max_bytes": 10}, "exactly one budget"),
    ({"max_bytes": 10.5}, "max_bytes=10.5 is not allowed"),
    ({"average_bits": 3, "candidates": [4, 2]}, "candidates"),
    ({"average_bits": 3, "candidates": [2, 9]}, "candidates"),
    ({"average_bits": 3, "solver": "cvxpy"}, "solver='cvxpy'"),
    ({"average_bits": 3, "freeze": 1.5}, "freeze"),
    ({"average_bits": 3, "tau": -1}, "tau"),
    ({"average_bits": 3, "pin": {"fc*": 12}}, r"pin\.fc\*=12"),
    ({"average_bits": 3, "momentum": 0}, "momentum"),
])  # fmt: skip
def test_bad_settings_are_config_errors(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_methods([{"name": "qbitopt", **settings}], total_steps=1)


def test_state_round_trips_and_a_hostile_state_is_refused() -> None:
    m = _train(_prepared(), {"average_bits": 3, "tau": 2, "freeze": 0.0}, steps=4)
    state = m.state_dict()
    fresh_model = _prepared()
    fresh_model.load_state_dict(_prepared().state_dict())
    (fresh,) = build_methods([{"name": "qbitopt", "average_bits": 3, "tau": 2, "freeze": 0.0}], total_steps=4)
    attach_methods([fresh], fresh_model)
    fresh.load_state_dict(state)
    assert fresh.history == m.history and all(torch.equal(fresh.fisher[k], v) for k, v in m.fisher.items())
    for bad in ({**state, "extra": 1},
                {**state, "fisher": {**state["fisher"], "conv2": torch.ones(3)}},
                {**state, "fisher": {**state["fisher"], "conv2": -torch.ones_like(state["fisher"]["conv2"])}},
                {**state, "ema_updates": -1}, {**state, "macs": [1.0]}, {**state, "history": "x"},
                {**state, "initialized": 1}):  # fmt: skip
        with pytest.raises(FormatError, match="qbitopt state"):
            fresh.load_state_dict(bad)


TINY = {
    "name": "q",
    "data": {"name": "synthetic", "train_subset": 640, "test_subset": 200, "batch_size": 64},
    "model": {"name": "mlp", "args": {"width": 32, "depth": 2}},
    "pretrain": {"epochs": 1},
    "quant": {"weight": {"bits": 4}, "act": {"bits": 8}},
    "qat": {"epochs": 2},
    "checkpoint_every": 3,
    "methods": [{"name": "qbitopt", "average_bits": 3, "tau": 3, "freeze": 0.1, "pin_first_last": False,
                 "candidates": [2, 3, 4, 5]}],
}  # fmt: skip


def test_a_run_logs_every_allocation_and_saves_each_layer_at_its_width(tmp_path: Path) -> None:
    summary = run(recipe_from_dict(TINY), tmp_path / "r", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    allocs = [a for r in rows if r["stage"] == "qat" for a in r["qbitopt"]["allocations"]]
    assert [a["step"] for a in allocs] == [0, 3, 6, 9, 12, 15, 18]  # 20 steps, none in the last 10 %
    assert all(a["met"] for a in allocs)
    loaded = lowbit.load(tmp_path / "r" / "model.safetensors", model=None)
    widths = {n: m.qweight.weight_bits for n, m in lowbit.api.quantized_layers(loaded)}
    assert widths == allocs[-1]["bits"]
    n = {name: m.qweight.weight_int.numel() for name, m in lowbit.api.quantized_layers(loaded)}
    mean = sum(n[k] * widths[k] for k in n) / sum(n.values())
    assert math.isclose(summary["mean_weight_bits"], mean) and mean <= 3 + 1e-12
    report = (tmp_path / "r" / "report.html").read_text()
    assert "Bit reallocation (QBitOpt)" in report and (tmp_path / "r" / "plots" / "qbitopt_bits.png").exists()


def test_resume_mid_run_reallocates_exactly_as_an_uninterrupted_run(tmp_path: Path, interrupt_method: None) -> None:
    from lowbit.checkpoint import load_checkpoint

    marker = tmp_path / "fired"
    # interrupted at step 8: the checkpoint of step 6 is resumed, and steps 7-8 (Fisher updates, no
    # allocation) and the allocation at 9 must come out as they would have
    stop = {"name": "interrupt", "at": 8, "marker": str(marker)}
    recipe = recipe_from_dict({**TINY, "methods": [*TINY["methods"], stop]})
    marker.touch()
    ref = run(recipe, tmp_path / "ref", progress=False)
    marker.unlink()
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "cut", progress=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "qat.safetensors")["step"] == 6
    resumed = run(recipe, tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "qat.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "qat.safetensors")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["methods"][0]["history"] == b["methods"][0]["history"] and len(a["methods"][0]["history"]) == 7
    for k, v in a["methods"][0]["fisher"].items():
        assert torch.equal(v, b["methods"][0]["fisher"][k]), k
    assert resumed["quant_metric"] == ref["quant_metric"]

    def qat_rows(d: str) -> list[str]:
        return [r for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if '"qat"' in r]

    assert qat_rows("cut") == qat_rows("ref")
