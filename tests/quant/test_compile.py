"""QAT under ``torch.compile``: every layer kind compiles with ``fullgraph=True`` (a graph break is an error)
and its forward and backward equal eager; a new bit width recompiles rather than keep running the old grid.

``backend="aot_eager"`` traces the forward and the backward graph as inductor would receive them, without
generating C++ (seconds on CPU). Compiled code never calls the fused CPU kernel (a pybind call dynamo cannot
trace) but its torch ops, so the eager reference runs those too (``kernels.torch_ops``); the kernel's own
outputs are the same values (checked here too), its scale gradients equal up to float summation order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import lowbit
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec
from lowbit.methods.lrqat import LowRankQuantLinear
from lowbit.quant import kernels
from lowbit.quant.modules import QuantConv2d, QuantLinear
from lowbit.quant.quantizer import Quantizer


def _cnn() -> tuple[nn.Module, Tensor]:
    """Conv-BN-ReLU twice and a linear head: the middle conv is the 4-bit one with a quantized input."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    config = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=4), first_last_bits=8)
    return lowbit.prepare(model, config, calib=[x]), x


def _mlp() -> tuple[nn.Module, Tensor]:
    """Per-group weights with a ragged last group (40 inputs, groups of 16), asymmetric inputs (zero points)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))
    x = torch.randn(6, 40)
    weight = QuantSpec(bits=4, granularity="group", group_size=16)
    config = QuantConfig(weight=weight, act=QuantSpec(bits=4, symmetric=False))
    return lowbit.prepare(model, config, calib=[x]), x


def _lrqat(recompute: bool = True) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(5, 32)
    weight = QuantSpec(bits=4, granularity="group", group_size=16, init="lp")
    config = QuantConfig(weight=weight, act=None, lowrank=LowRankSpec(rank=4, recompute=recompute))
    model = lowbit.prepare(model, config, calib=[x])
    with torch.no_grad():  # adapters away from A = 0, so that they move the integers and get gradients
        for m in model.modules():
            if isinstance(m, LowRankQuantLinear):
                m.lora_a.normal_(0, 0.5)
    return model, x


CASES: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "cnn": _cnn,
    "mlp_group": _mlp,
    "lrqat": _lrqat,
    "lrqat_plain": lambda: _lrqat(recompute=False),
}
KINDS = {"cnn": QuantConv2d, "mlp_group": QuantLinear, "lrqat": LowRankQuantLinear, "lrqat_plain": LowRankQuantLinear}


def _compile(model: nn.Module) -> tuple[nn.Module, CompileCounterWithBackend]:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=counter, fullgraph=True), counter  # type: ignore[return-value]


def _step(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The output and the gradient of every trainable parameter for one loss."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).square().sum().backward()
    plain = getattr(model, "_orig_mod", model)  # a compiled model's parameters, named as the eager one's
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    return y.detach(), grads  # type: ignore[return-value]


def _trainable_kinds(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(CASES))
def test_compiles_without_graph_break_and_matches_eager(case: str) -> None:
    model, x = CASES[case]()
    assert any(isinstance(m, KINDS[case]) for m in model.modules())
    compiled, counter = _compile(copy.deepcopy(model))
    fused = copy.deepcopy(model)
    with kernels.torch_ops():
        y_ref, g_ref = _step(model, x)
    y, g = _step(compiled, x)
    assert counter.frame_count == 1  # one graph: fullgraph=True has already refused any break
    assert torch.equal(y, y_ref)
    assert torch.equal(y, fused(x))  # the fused kernel where it is built: the same values
    assert g.keys() == g_ref.keys()
    expected = {"cnn": {"weight", "bias", "scale"}, "mlp_group": {"weight", "bias", "scale", "zero_point"}}
    assert expected.get(case, {"lora_a", "lora_b", "scale"}) <= _trainable_kinds(model)
    for name in g_ref:
        assert g_ref[name].abs().sum() > 0, f"{name}: a zero gradient compares nothing"
        assert torch.equal(g[name], g_ref[name]), f"{name}: {(g[name] - g_ref[name]).abs().max():.3g} from eager"


@pytest.mark.parametrize("case", ["cnn", "lrqat"])
def test_trains_compiled_as_eager_without_recompiling(case: str) -> None:
    model, x = CASES[case]()
    compiled, counter = _compile(copy.deepcopy(model))
    runs = []
    for net in (model, compiled):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        outs = []
        with kernels.torch_ops():  # the ops the compiled graphs run (see the module docstring)
            for _ in range(2):
                y, _ = _step(net, x)
                opt.step()
                outs.append(y)
            outs.append(net(x).detach())
        runs.append(outs)
    assert counter.frame_count == 1  # the steps reuse the first graph
    for y, y_ref in zip(runs[1], runs[0], strict=True):
        assert torch.equal(y, y_ref)


def _quantizers(model: nn.Module) -> list[Quantizer]:
    return [m.weight_quantizer for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)]


def _set_bits(model: nn.Module, bits: int) -> None:
    """A new bit width for one 4-bit layer: the layer's own ``set_bits`` for LR-QAT (it re-expresses Φ0)."""
    lowrank = [m for m in model.modules() if isinstance(m, LowRankQuantLinear)]
    if lowrank:
        lowrank[0].set_bits(bits)
    else:
        _quantizers(model)[1].set_bits(bits)  # the middle conv of the CNN (the others are at 8 bits)


@pytest.mark.parametrize("case", ["cnn", "mlp_group", "lrqat"])
def test_set_bits_after_compiling_runs_the_new_grid(case: str) -> None:
    model, x = CASES[case]()
    model.eval()  # batch norm on its running statistics: the outputs depend on the weights' grid only
    compiled, counter = _compile(model)  # the same modules: what set_bits changes, the compiled model sees
    before = compiled(x).detach()
    _set_bits(model, 2)
    after, eager = compiled(x).detach(), model(x).detach()
    assert not torch.equal(after, before)
    assert torch.equal(after, eager)
    assert counter.frame_count == 2  # the grid is a constant of the graph: a new one recompiles


@pytest.mark.parametrize("case", ["mlp_group", "lrqat"])
def test_load_state_dict_after_compiling_runs_the_loaded_grid(case: str) -> None:
    model, x = CASES[case]()
    other, _ = CASES[case]()
    _set_bits(other, 3)
    compiled, counter = _compile(model)
    compiled(x)
    model.load_state_dict(other.state_dict())  # writes the bits buffers in place: the kept grid follows
    assert torch.equal(compiled(x).detach(), other(x).detach())
    assert counter.frame_count == 2
