"""The contenders of benchmarks/peers.py: how each toolkit turns a float model into a QAT model.

Each ``prepare_*`` takes the float model, the bit width and the calibration batches and returns a
``Prepared``: the model, its weights (trained with SGD), its learnable quantizer parameters (Adam), and
what to do before evaluating it. ``TOOLKITS`` names them; peers.py's docstring states the protocol.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, QuantSpec
from lowbit.train import split_parameters

if TYPE_CHECKING:
    from torch.ao.quantization import QConfig


# -- what every toolkit hands back ---------------------------------------------------------------------


@dataclass
class Prepared:
    """A model ready for QAT: its weights (SGD), its learnable quantizer parameters (Adam), and what to do
    before evaluating it."""

    model: nn.Module
    weights: list[nn.Parameter]
    qparams: list[nn.Parameter] = field(default_factory=list)
    before_eval: Callable[[nn.Module], None] | None = None


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Conv2d / Linear layers in module order: the first and the last are kept at 8 bits."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


@torch.no_grad()
def _input_signed(model: nn.Module, names: list[str], calib: list[torch.Tensor]) -> dict[str, bool]:
    """Whether each named layer sees a negative input on the calibration batches (in eval mode)."""
    seen = dict.fromkeys(names, False)
    hooks = []
    for name in names:

        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
            seen[name] = seen[name] or bool((args[0] < 0).any())

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for x in calib:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return seen


@contextlib.contextmanager
def _quiet_imports() -> Iterator[None]:
    """Silence the peers' import-time chatter (torchao's CUDA-only extensions on a CPU build, Brevitas'
    optional Hadamard kernels, torch.ao's deprecation notice); real import errors still raise."""
    names = ("torchao", "torch.utils._pytree")
    levels = {n: logging.getLogger(n).level for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


# -- the contenders ----------------------------------------------------------------------------------


def prepare_float(model: nn.Module, bits: int, calib: list[torch.Tensor]) -> Prepared:
    return Prepared(model, [p for p in model.parameters() if p.requires_grad])


def prepare_lowbit(model: nn.Module, bits: int, calib: list[torch.Tensor]) -> Prepared:
    config = QuantConfig(
        weight=QuantSpec(bits=bits, granularity="channel"), act=QuantSpec(bits=bits), first_last_bits=8
    )
    lowbit.prepare(model, config, calib=calib)
    weights, qparams = split_parameters(model)
    return Prepared(model, weights, qparams)


def _eager_qconfig(weight_bits: int, act_bits: int) -> QConfig:
    import torch.ao.quantization as tq

    act = tq.FakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=2**act_bits - 1,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    weight = tq.FakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-(2 ** (weight_bits - 1)),
        quant_max=2 ** (weight_bits - 1) - 1,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    return tq.QConfig(activation=act, weight=weight)


def _fuse_pairs(model: nn.Module) -> list[list[str]]:
    """Conv2d+BatchNorm2d and Linear+BatchNorm1d that follow each other inside an nn.Sequential."""
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential):
            continue
        kids = list(mod.named_children())
        for (a, ma), (b, mb) in zip(kids, kids[1:], strict=False):
            if (type(ma) is nn.Conv2d and type(mb) is nn.BatchNorm2d) or (
                type(ma) is nn.Linear and type(mb) is nn.BatchNorm1d
            ):
                prefix = f"{name}." if name else ""
                pairs.append([prefix + a, prefix + b])
    return pairs


def prepare_eager(model: nn.Module, bits: int, calib: list[torch.Tensor]) -> Prepared:
    with _quiet_imports():
        import torch.ao.quantization as tq
        from torch.ao.nn.intrinsic import _FusedModule

        model.train()
        tq.fuse_modules_qat(model, _fuse_pairs(model), inplace=True)
        # Eager mode quantizes each module's *output*: the layer that feeds the last layer (and the
        # modules between them) output 8 bits, so the last layer's input is 8-bit as in lowbit.
        units: list[nn.Module] = []
        for _, mod in model.named_modules():
            inside_fused = any(isinstance(u, _FusedModule) and mod in u.modules() for u in units[-1:])
            if (len(list(mod.children())) == 0 or isinstance(mod, _FusedModule)) and not inside_fused:
                units.append(mod)
        weighted = [i for i, u in enumerate(units) if isinstance(u, nn.Conv2d | nn.Linear | _FusedModule)]
        first, last = weighted[0], weighted[-1]
        penultimate = weighted[-2] if len(weighted) > 1 else last
        for i, u in enumerate(units):
            qconfig = _eager_qconfig(8 if i in (first, last) else bits, 8 if i >= penultimate else bits)
            u.qconfig = qconfig  # type: ignore[assignment]  # eager mode reads this attribute
        tq.prepare_qat(model, inplace=True)
        with torch.no_grad():  # calibration: the observers see the calibration batches (BN in eval mode)
            model.eval()
            for x in calib:
                model(x)
            model.train()

    def freeze(m: nn.Module) -> None:
        m.apply(tq.disable_observer)  # otherwise the moving averages keep tracking the test set

    return Prepared(model, [p for p in model.parameters() if p.requires_grad], before_eval=freeze)


def prepare_brevitas(model: nn.Module, bits: int, calib: list[torch.Tensor]) -> Prepared:
    with _quiet_imports():
        from brevitas.graph.calibrate import calibration_mode
        from brevitas.nn import QuantConv2d, QuantLinear
        from brevitas.proxy.quant_proxy import QuantProxyFromInjector
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    layers = _quantizable(model)
    signed = _input_signed(model, [n for n, _ in layers], calib)
    for i, (name, mod) in enumerate(layers):
        is_first, is_last = i == 0, i == len(layers) - 1
        kwargs: dict[str, object] = {
            "weight_quant": Int8WeightPerChannelFloat,
            "weight_bit_width": 8 if is_first or is_last else bits,
            "bias": mod.bias is not None,
            "input_quant": None,
        }
        if not is_first:
            kwargs["input_quant"] = Int8ActPerTensorFloat if signed[name] else Uint8ActPerTensorFloat
            kwargs["input_bit_width"] = 8 if is_last else bits
        if isinstance(mod, nn.Conv2d):
            new: QuantConv2d | QuantLinear = QuantConv2d(
                mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                mod.groups, padding_mode=mod.padding_mode, **kwargs,
            )  # fmt: skip
        else:
            new = QuantLinear(mod.in_features, mod.out_features, **kwargs)
        with torch.no_grad():
            new.weight.copy_(mod.weight)
            if mod.bias is not None:
                new.bias.copy_(mod.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    # calibration_mode runs the model in training mode: keep BatchNorm's running statistics as they were.
    bn_state = {k: v.clone() for k, v in model.state_dict().items() if ".running_" in k or "num_batches" in k}
    with torch.no_grad(), calibration_mode(model):
        for x in calib:
            model(x)
    model.load_state_dict(bn_state, strict=False)
    model.train()
    qids = {id(p) for m in model.modules() if isinstance(m, QuantProxyFromInjector) for p in m.parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in qids]
    qparams = [p for p in model.parameters() if p.requires_grad and id(p) in qids]
    return Prepared(model, weights, qparams)


def prepare_torchao(model: nn.Module, bits: int, calib: list[torch.Tensor]) -> Prepared:
    with _quiet_imports():
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    def dtype(b: int) -> torch.dtype:
        return torch.int8 if b == 8 else getattr(torch, f"int{b}")  # torch.int1 .. torch.int7

    def weight(b: int) -> IntxFakeQuantizeConfig:
        return IntxFakeQuantizeConfig(dtype(b), "per_channel")

    def act(b: int) -> IntxFakeQuantizeConfig:
        return IntxFakeQuantizeConfig(dtype(b), "per_token", is_symmetric=False)

    names = [n for n, _ in _quantizable(model)]
    first, last = names[0], names[-1]
    # Decide every layer's role before any swap: FakeQuantizedLinear is itself an nn.Linear.
    plan = {n: (weight(bits), act(bits)) for n in names}
    plan[last] = (weight(8), act(8))
    plan[first] = (weight(8), None)
    for name, (w, a) in plan.items():
        with _quiet_imports():  # quantize_ imports more of torchao on first use
            quantize_(
                model, QATConfig(activation_config=a, weight_config=w, step="prepare"), lambda m, fqn, n=name: fqn == n
            )
    return Prepared(model, [p for p in model.parameters() if p.requires_grad])


def _needs_linear_only(model: nn.Module) -> str | None:
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    if convs:
        return f"not run: torchao QAT swaps nn.Linear only and would leave all {convs} Conv2d float"
    return None


@dataclass(frozen=True)
class Toolkit:
    """A contender: how to prepare a float model, and what it needs."""

    label: str
    prepare: Callable[[nn.Module, int, list[torch.Tensor]], Prepared]
    module: str | None = None  # imported to check availability; its distribution names the version
    unsupported: Callable[[nn.Module], str | None] | None = None

    def problem(self) -> str | None:
        """Why this toolkit cannot run here (an import error), or None."""
        if self.module is None:
            return None
        try:
            with _quiet_imports():
                importlib.import_module(self.module)
        except Exception as e:  # any import-time failure: the row says "not available" instead
            return f"not available: {type(e).__name__}: {e}"
        return None

    def version(self) -> str:
        dist = {"torch.ao.quantization": "torch"}.get(self.module or "", self.module or "")
        try:
            return importlib.metadata.version(dist) if dist else lowbit.__version__
        except importlib.metadata.PackageNotFoundError:
            return "?"


TOOLKITS: dict[str, Toolkit] = {
    "lowbit": Toolkit("lowbit (LSQ)", prepare_lowbit),
    "eager": Toolkit("torch.ao eager QAT", prepare_eager, "torch.ao.quantization"),
    "brevitas": Toolkit("brevitas", prepare_brevitas, "brevitas"),
    "torchao": Toolkit("torchao (Linear only)", prepare_torchao, "torchao", _needs_linear_only),
}
FLOAT = Toolkit("float", prepare_float)
