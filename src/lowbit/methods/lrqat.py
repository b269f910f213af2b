"""LR-QAT: low-rank adapters inside the integer grid (Bondarenko, Del Chiaro, Nagel, 2024).

For a pretrained weight ``W0`` (out × in) with initial scale ``s0`` (per output channel or per group,
range-initialised by an Lp-norm grid search, p = 4)::

    Φ0 = φ(W0 / s0)                                        computed once, frozen, stored down-cast
    Ŵ  = s · clip(round_STE(Φ0 + (α/r)·A·B), qmin, qmax)   A (out × r) = 0, B (r × in) Kaiming

Only ``A``, ``B`` and ``s`` train. The adapter sits inside the rounding, so the trained layer merges
exactly into one b-bit integer matrix ``W_int = clip(round(Φ0 + (α/r)AB))`` with scale ``s``
(``convert_lowrank``, this layer kind's entry in ``lowbit.convert``'s converter table), with no inference
overhead. ``A = 0`` makes step 0 equal round-to-nearest of ``Φ0``.

The down-cast ``φ`` (``phi``):

- ``fixed_point8`` (default): int8 fixed point Q(b).(8−b), ``φ(x) = round(2^(8−b)·clip(x, qmin, qmax))``,
  ``φ⁻¹(y) = y / 2^(8−b)``; exact for values on that grid (an unsigned grid is shifted into the signed one);
- ``bf16``; ``fp32`` (no down-cast, for reference);
- ``int``: ``Φ0`` rounded to integers and stored packed at b bits (``lowbit.export.pack``), the paper's
  lowest-memory variant; step 0 is then exactly round-to-nearest of ``W0/s0``.

Each storage is a codec object (``PHI_CODECS``) chosen once at construction. ``phi_bits`` (a buffer)
records the grid ``Φ0`` is expressed in; the bit width itself lives only in the weight quantizer.
``set_bits(b')`` keeps the effective weights' range: the quantizer's step becomes
``s' = s·(2^b − 1)/(2^b' − 1)``, and ``Φ0`` and ``A`` are divided by the same ratio, so
``Φ0' + (α/r)A'B = (Φ0 + (α/r)AB)·s/s'`` (up to the storage's own rounding of ``Φ0'``).

Layer kinds here (both enter through ``lowbit.prepare`` with a ``lowrank`` setting, ``LowRankSpec``):
``LowRankQuantLinear`` (``variant: lrqat``; ``rank: 0`` is the scales-only baseline) and
``QLoRALinear`` (``variant: qlora``: frozen round-to-nearest integers, float adapters outside the grid;
it converts to an integer layer that keeps the float adapters beside it, since merging them would
re-quantize and lose what they learned below the grid step).

With ``checkpoint=True`` (default) building ``Ŵ`` and the matmul are one autograd function that
saves only the layer input and recomputes ``Ŵ`` in the backward pass, so no full-size intermediate
(upcast Φ0, AB, the rounded matrix, Ŵ) is stored between the passes. Its backward is the STE
gradient written out (``∂L/∂(AB) = (α/r)·s·∂L/∂Ŵ ⊙ 1[qmin ≤ round(·) ≤ qmax]``, ``∂L/∂s = Σ ∂L/∂Ŵ ⊙
W_int``), equal to autograd's through the plain path (tested); it does what the paper's
``torch.utils.checkpoint`` wrapper does at about a third of the per-layer operator count, which is
what a small model's step time is made of. ``checkpoint=False`` is the plain autograd path. Both compile
with ``torch.compile(fullgraph=True)`` (dynamo traces the function, layer argument and hand-written backward
included); ``phi_bits`` is then the Python int kept beside the buffer, as the quantizer keeps its grid.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lowbit.config import LowRankSpec, QuantSpec
from lowbit.errors import ConfigError
from lowbit.export.intmodules import IntLinear, IntWeight, LowRankAdapter, frozen_copy, odd_if_stretched
from lowbit.quant import functional as F
from lowbit.quant.calibrate import init_range
from lowbit.quant.functional import dequantize_weight, int_dtype
from lowbit.quant.phi_storage import PHI_CODECS, from_fixed_point, to_fixed_point
from lowbit.quant.quantizer import Quantizer

__all__ = [
    "LowRankQuantLinear",
    "QLoRALinear",
    "to_fixed_point",
    "from_fixed_point",
    "convert_lowrank",
    "convert_qlora",
    "PHI_CODECS",
]


def _scale_grad(grad_w: Tensor, w_int: Tensor, scale: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """``Σ ∂L/∂Ŵ ⊙ W_int`` summed into the scale's shape (the gradient of ``dequantize_weight`` to ``s``)."""
    prod = grad_w * w_int
    if granularity == "group":
        assert group_size is not None
        return F.pad_groups(prod, scale.shape[-1], group_size).sum(-1).reshape(scale.shape)
    if granularity == "channel":
        return prod.sum(1).reshape(scale.shape)
    return prod.sum().reshape(scale.shape)


def _input_quantizer(act: QuantSpec | None, in_features: int, device: torch.device) -> Quantizer | None:
    if act is None:
        return None
    return Quantizer(act, None, channels=in_features if act.granularity == "channel" else None).to(device)


@torch.no_grad()
def _grid_units(w0: Tensor, spec: QuantSpec) -> tuple[Quantizer, Tensor]:
    """A weight quantizer range-initialised on ``w0`` (out, in), and ``W0 / s0 + z0`` in its grid units.

    An asymmetric grid's zero point ``z0`` (an integer) is frozen: the adapters move the integers, the
    scale learns, and ``Ŵ = s·(W_int − z0)`` merges into integers with that zero point."""
    if spec.binary is not None:
        raise ConfigError("low-rank layers (LR-QAT, QLoRA-style) keep their weights on an integer grid; the binary "
                          "grid {-s, +s} is not one: add a rule with lowrank: null for binary layers")  # fmt: skip
    q = Quantizer(spec, tuple(w0.shape)).to(w0.device)
    init_range(q, w0)
    qmin, qmax = q.int_grid()
    s0, z0 = q.qparams(w0, qmax)
    units = q.view(w0) / F.positive_scale(s0, F.SCALE_EPS)
    if q.stretched:  # levels (k + ½)·s: Φ0 = W0/s0 − ½ on the signed grid of k (a fixed zero point of −½)
        units = units - 0.5
    if z0 is not None:
        q.zero_point.requires_grad_(False)
        q.zero_point.copy_(q.zero_point.clamp(qmin, qmax).round())
        units = units + q.zero_point_view(w0)
    return q, q.unview(units, w0.shape)


def _frozen_zero(q: Quantizer) -> Tensor | None:
    """The frozen zero point of a low-rank layer's grid in the quantizer's stored shape: an asymmetric grid's
    integer one, −½ for the stretched grid (``Ŵ = s·(W_int + ½)``), or None."""
    if q.stretched:
        return torch.full_like(q.scale, -0.5).detach()
    return None if q.zero_point is None else q.zero_point.detach()


def set_bits_unsupported(q: Quantizer) -> str | None:
    """Why a low-rank layer on this grid cannot change bit width (its frozen zero point), or None."""
    if q.zero_point is not None or q.stretched:
        return ("set_bits on a low-rank layer with an asymmetric or stretched grid is not supported (its frozen zero "
                "point would leave the grid): use a symmetric weight grid with methods that change bits")
    return None


def _refuse_asymmetric_set_bits(q: Quantizer) -> None:
    why = set_bits_unsupported(q)
    if why:
        raise ConfigError(why)


def _frozen_bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


def _grid_ratio(q: Quantizer, bits: int) -> float:
    """``(qmax − qmin) / (qmax' − qmin')``: how much the step grows when ``q`` goes to ``bits``."""
    qmin, qmax = q.int_grid()
    nmin, nmax = F.int_range(bits, bool(q.signed))
    return (qmax - qmin) / (nmax - nmin)


class _LowRankQuantLinearFn(torch.autograd.Function):
    """``y = x·Ŵᵀ + b`` with ``Ŵ`` rebuilt from (Φ0, A, B, s) in both passes; saves only ``x``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,
        lora_a: Tensor,
        lora_b: Tensor,
        scale: Tensor,
        bias: Tensor | None,
        layer: LowRankQuantLinear,
    ) -> Tensor:
        w_int, _, s_pos = layer._build(lora_a, lora_b, scale, mask=False)
        w = dequantize_weight(w_int, s_pos, _frozen_zero(layer.weight_quantizer), *layer._qlayout())
        ctx.save_for_backward(x, lora_a, lora_b, scale)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, lora_a, lora_b, scale = ctx.saved_tensors
        layer: LowRankQuantLinear = ctx.layer
        gran, _, gs = layer._qlayout()
        w_int, inside, s_pos = layer._build(lora_a, lora_b, scale)
        z = _frozen_zero(layer.weight_quantizer)
        w = dequantize_weight(w_int, s_pos, z, gran, 0, gs)
        grad_x = grad_y @ w.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = grad_s = grad_bias = None
        if any(ctx.needs_input_grad[1:4]):
            gy = grad_y.reshape(-1, grad_y.shape[-1]).float()
            grad_w = gy.t() @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
            if ctx.needs_input_grad[3]:
                sign = torch.where(scale < 0, -1.0, 1.0)  # positive_scale's gradient
                centered = w_int if z is None else dequantize_weight(w_int, torch.ones_like(s_pos), z, gran, 0, gs)
                grad_s = _scale_grad(grad_w, centered, scale, gran, gs) * sign
            layer._call_weight_grad_hooks(grad_w)
            if layer.rank > 0 and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
                # through dequantize (× s), clamp (1 inside the grid) and round (STE), then (α/r)·A·B
                grad_t = dequantize_weight(grad_w * inside, s_pos, None, gran, 0, gs)
                c = layer.alpha / layer.rank
                grad_a = (grad_t @ lora_b.t()) * c if ctx.needs_input_grad[1] else None
                grad_b = (lora_a.t() @ grad_t) * c if ctx.needs_input_grad[2] else None
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_a, grad_b, grad_s, grad_bias, None


class LowRankQuantLinear(nn.Module):
    """A linear layer trained by LR-QAT: frozen down-cast ``Φ0``, trainable ``A``, ``B`` and scale ``s``."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: QuantSpec,
        rank: int,
        alpha: float = 1.0,
        phi: str = "fixed_point8",
        checkpoint: bool = True,
        act: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        if phi not in PHI_CODECS:
            raise ConfigError(f"phi={phi!r} is not allowed: use one of {', '.join(PHI_CODECS)}")
        self.codec = PHI_CODECS[phi]
        self.codec.check(spec)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(out_f, in_f):
            raise ConfigError(
                f"rank={rank!r} is not allowed for a {out_f}×{in_f} layer: use 1..{min(out_f, in_f)} (0: scales only)"
            )
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.phi, self.use_checkpoint = rank, float(alpha), phi, checkpoint
        w0 = linear.weight.detach().float()
        self.weight_quantizer, ratio = _grid_units(w0, spec)
        self.input_quantizer = _input_quantizer(act, in_f, w0.device)
        q = self.weight_quantizer
        # a frozen parameter rather than a buffer, so FSDP shards it with the rest (lowbit.distributed)
        self.phi0 = nn.Parameter(self.codec.encode(ratio, spec.bits, bool(q.signed)), requires_grad=False)
        self.register_buffer("phi_bits", torch.tensor(spec.bits, dtype=torch.int64))  # the grid Φ0 is in
        self._keep_phi_bits(spec.bits)
        self.lora_a = nn.Parameter(torch.zeros(out_f, rank, device=w0.device), requires_grad=rank > 0)
        self.lora_b = nn.Parameter(torch.empty(rank, in_f, device=w0.device), requires_grad=rank > 0)
        if rank > 0:
            nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
        self.bias = _frozen_bias(linear)
        # see watch_weight_grad; an OrderedDict because RemovableHandle keeps a weak reference to it
        self.weight_grad_hooks: OrderedDict[int, Callable[[Tensor], None]] = OrderedDict()

    def watch_weight_grad(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(grad)`` with the loss's gradient w.r.t. the dequantized weight ``s·W_int`` (out, in) on
        every backward pass that trains this layer (its scale or adapters)."""
        handle = RemovableHandle(self.weight_grad_hooks)
        self.weight_grad_hooks[handle.id] = fn
        return handle

    def _call_weight_grad_hooks(self, grad: Tensor) -> None:
        for fn in list(self.weight_grad_hooks.values()):
            fn(grad)

    @classmethod
    def from_float(
        cls, mod: nn.Linear, weight: QuantSpec | None, act: QuantSpec | None, lowrank: LowRankSpec | None = None
    ) -> LowRankQuantLinear:
        """The layer kind ``prepare`` builds for ``lowrank: {variant: lrqat}``."""
        if weight is None or lowrank is None:
            raise ConfigError("a low-rank layer needs a weight spec and a lowrank setting")
        new = cls(mod, weight, lowrank.rank, lowrank.alpha, lowrank.phi, lowrank.recompute, act)
        return new.train(mod.training)

    def _phi_bits(self) -> int:
        """``phi_bits`` as a Python int, cached on the buffer's identity and version (no device sync); under
        ``torch.compile`` the kept value as it is, like ``Quantizer.int_grid`` (refreshed by ``set_bits`` and
        ``load_state_dict``)."""
        if torch.compiler.is_compiling():
            return self.__dict__["_phi_bits_value"]
        if self.__dict__.get("_phi_bits_key") != (id(self.phi_bits), self.phi_bits._version):
            self._keep_phi_bits(int(self.phi_bits))
        return self.__dict__["_phi_bits_value"]

    def _keep_phi_bits(self, bits: int) -> None:
        self.__dict__["_phi_bits_key"] = (id(self.phi_bits), self.phi_bits._version)
        self.__dict__["_phi_bits_value"] = bits

    def phi0_float(self) -> Tensor:
        """``Φ0`` upcast to float32, (out, in)."""
        q = self.weight_quantizer
        bits = self._phi_bits()
        if bits != q.nbits:
            raise ConfigError(
                f"this LR-QAT layer's Φ0 is expressed for {bits} bits but its weight quantizer is at {q.nbits}: "
                "change bits with the layer's set_bits (it re-expresses Φ0), not the quantizer's"
            )
        return self.codec.decode(self.phi0, bits, bool(q.int_grid()[0] < 0), (self.out_features, self.in_features))

    def weight_int(self, transform: bool = True) -> Tensor:
        """``clip(round_STE(Φ0 + (α/r)·A·B), qmin, qmax)`` (float dtype, STE gradients to A and B), then the
        quantizer's integer transform (frozen integers) unless ``transform=False``."""
        q = self.weight_quantizer
        qmin, qmax = q.int_grid()
        t = self.phi0_float()
        if self.rank > 0:
            t = t + (self.alpha / self.rank) * (self.lora_a @ self.lora_b)
        w = F.round_ste(t).clamp(qmin, qmax)
        if transform and q.int_transform is not None:
            w = q.unview(q.int_transform(q.view(w), q), w.shape)
        return w

    def quantized_weight(self) -> Tensor:
        q = self.weight_quantizer
        s = F.positive_scale(q.scale_value(), F.SCALE_EPS)
        return dequantize_weight(self.weight_int(), s, _frozen_zero(q), q.granularity, q.axis, q.group_size)

    def _qlayout(self) -> tuple[str, int, int | None]:
        q = self.weight_quantizer
        return q.granularity, q.axis, q.group_size

    @torch.no_grad()
    def _build(
        self, lora_a: Tensor, lora_b: Tensor, scale: Tensor, mask: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(W_int as float, where the clamp passes gradients (if ``mask``), the positive scale), no autograd."""
        qmin, qmax = self.weight_quantizer.int_grid()
        t = self.phi0_float()
        if self.rank > 0:
            t = torch.addmm(t, lora_a.float(), lora_b.float(), alpha=self.alpha / self.rank)
        r = torch.round(t)  # not in place: t may be the fp32 Φ0 buffer itself
        inside = ((r >= qmin) & (r <= qmax)) if mask else None
        return r.clamp_(qmin, qmax), inside, scale.abs().clamp_min(F.SCALE_EPS)  # = F.positive_scale's value

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        q = self.weight_quantizer
        t = q.int_transform
        plain_ints = t is None or (callable(getattr(t, "passthrough", None)) and t.passthrough())
        if self.use_checkpoint and plain_ints and torch.is_grad_enabled():
            return _LowRankQuantLinearFn.apply(x, self.lora_a, self.lora_b, q.scale_value(), self.bias, self)
        # the same dequantization the converted IntLinear uses, so converting is exact
        w = self.quantized_weight()
        if self.weight_grad_hooks and w.requires_grad:
            w.register_hook(self._call_weight_grad_hooks)
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    def set_bits_unsupported(self) -> str | None:
        return set_bits_unsupported(self.weight_quantizer)

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Move to a ``bits``-wide grid keeping the effective weights' range (see the module docstring)."""
        q = self.weight_quantizer
        _refuse_asymmetric_set_bits(q)
        ratio = _grid_ratio(q, bits)  # validates nothing yet: set_bits below does
        old = self.phi0_float()
        q.set_bits(bits)  # keep_range: s' = s·ratio
        self.phi0 = nn.Parameter(self.codec.encode(old / ratio, bits, bool(q.signed)), requires_grad=False)
        self.phi_bits.fill_(bits)
        self._keep_phi_bits(bits)
        self.lora_a.div_(ratio)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # packed-int Φ0 changes size with the bit width: a state saved after set_bits brings its own shape
        incoming = state_dict.get(prefix + "phi0")
        if isinstance(incoming, Tensor) and incoming.shape != self.phi0.shape and incoming.dtype == self.phi0.dtype:
            self.phi0 = nn.Parameter(torch.empty_like(incoming, device=self.phi0.device), requires_grad=False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._keep_phi_bits(int(self.phi_bits))  # the loaded grid, before any compiled call asks

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, phi={self.phi}"


class QLoRALinear(nn.Module):
    """The QLoRA-style baseline: frozen round-to-nearest integer weights, float adapters *outside* the grid.

    ``y = s0·W_int·x + (α/r)·A·(B·x)``; only ``A`` and ``B`` train. Unlike LR-QAT it does not merge into
    integers without re-quantizing (and losing what the adapters learned below the grid step), so it
    converts to an integer layer with the float adapters kept beside it.
    """

    def __init__(
        self, linear: nn.Linear, spec: QuantSpec, rank: int, alpha: float = 1.0, act: QuantSpec | None = None
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(linear.weight.shape):
            raise ConfigError(f"rank={rank!r} is not allowed for a {tuple(linear.weight.shape)} layer")
        out_f, in_f = linear.weight.shape
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha = rank, float(alpha)
        w0 = linear.weight.detach().float()
        self.weight_quantizer, ratio = _grid_units(w0, spec)
        self.input_quantizer = _input_quantizer(act, in_f, w0.device)
        q = self.weight_quantizer
        qmin, qmax = q.int_grid()
        q.scale.requires_grad_(False)
        self.register_buffer("base_int", torch.round(ratio.clamp(qmin, qmax)).to(int_dtype(qmin, qmax)))
        # the frozen weight dequantized once (not saved: it follows from base_int and the frozen scale), so
        # that no step rebuilds it or keeps a copy of it for the backward pass
        self.register_buffer("weight", self._dequantized(), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_weight)  # after the quantizer's scale is loaded too
        self.lora_a = nn.Parameter(torch.zeros(out_f, rank, device=w0.device))
        self.lora_b = nn.Parameter(torch.empty(rank, in_f, device=w0.device))
        nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
        self.bias = _frozen_bias(linear)

    @classmethod
    def from_float(
        cls, mod: nn.Linear, weight: QuantSpec | None, act: QuantSpec | None, lowrank: LowRankSpec | None = None
    ) -> QLoRALinear:
        """The layer kind ``prepare`` builds for ``lowrank: {variant: qlora}``."""
        if weight is None or lowrank is None:
            raise ConfigError("a low-rank layer needs a weight spec and a lowrank setting")
        return cls(mod, weight, lowrank.rank, lowrank.alpha, act).train(mod.training)

    @torch.no_grad()
    def _dequantized(self) -> Tensor:
        q = self.weight_quantizer
        s = F.positive_scale(q.scale_value(), F.SCALE_EPS)
        return dequantize_weight(self.base_int, s, _frozen_zero(q), q.granularity, q.axis, q.group_size)

    def weight_int(self, transform: bool = True) -> Tensor:
        return self.base_int.float()

    def quantized_weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = nn.functional.linear(x, self.weight.to(x.dtype), bias)
        lora = nn.functional.linear(nn.functional.linear(x, self.lora_b.to(x.dtype)), self.lora_a.to(x.dtype))
        return y + (self.alpha / self.rank) * lora

    def set_bits_unsupported(self) -> str | None:
        return set_bits_unsupported(self.weight_quantizer)

    @torch.no_grad()
    def set_bits(self, bits: int) -> None:
        """Re-round the frozen integers onto a ``bits``-wide grid over the same range."""
        q = self.weight_quantizer
        _refuse_asymmetric_set_bits(q)
        ratio = _grid_ratio(q, bits)
        old = self.base_int.float()
        q.set_bits(bits)
        qmin, qmax = q.int_grid()
        self.base_int = torch.round(old / ratio).clamp(qmin, qmax).to(int_dtype(qmin, qmax))
        self.weight = self._dequantized()

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g} (adapters outside)"


def _refresh_weight(layer: QLoRALinear, incompatible: Any) -> None:
    layer.weight = layer._dequantized()  # loaded integers or scale may differ from the cached weight


# -- converters: this file's entries in lowbit.convert's table ----------------------------------------


def _int_weight(layer: LowRankQuantLinear | QLoRALinear) -> IntWeight:
    q = layer.weight_quantizer
    scale, zero = q.export_qparams()
    ints, scale, bits = odd_if_stretched(q, layer.weight_int().round(), scale)
    qmin, qmax = F.int_range(bits, bool(q.signed))
    ints = ints.to(int_dtype(qmin, qmax))
    iq = frozen_copy(layer.input_quantizer)
    return IntWeight(ints, scale, zero, bits, bool(q.signed), q.granularity, q.axis, q.group_size, iq)


@torch.no_grad()
def convert_lowrank(layer: LowRankQuantLinear) -> IntLinear:
    """The exact merge: ``IntLinear`` holding ``W_int = clip(round(Φ0 + (α/r)AB))`` and the scale ``s``."""
    bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return IntLinear(layer.in_features, layer.out_features, _int_weight(layer), bias)


@torch.no_grad()
def convert_qlora(layer: QLoRALinear) -> IntLinear:
    """``IntLinear`` of the frozen integers, with the float adapters kept beside it (outputs unchanged)."""
    bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    adapter = LowRankAdapter(layer.lora_a.detach().clone(), layer.lora_b.detach().clone(), layer.alpha)
    return IntLinear(layer.in_features, layer.out_features, _int_weight(layer), bias, adapter)


LOWRANK_KINDS: dict[str, Any] = {"lrqat": LowRankQuantLinear, "qlora": QLoRALinear}
