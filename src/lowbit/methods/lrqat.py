"""LR-QAT: low-rank adapters inside the integer grid (Bondarenko, Del Chiaro, Nagel, 2024).

For a pretrained weight ``W0`` (out × in) with initial scale ``s0`` (per output channel or per group,
range-initialised by an Lp-norm grid search, p = 4)::

    Φ0 = φ(W0 / s0)                                        computed once, frozen, stored down-cast
    Ŵ  = s · clip(round_STE(Φ0 + (α/r)·A·B), qmin, qmax)   A (out × r) = 0, B (r × in) Kaiming

Only ``A``, ``B`` and ``s`` train. The adapter sits inside the rounding, so the trained layer merges
exactly into one b-bit integer matrix ``W_int = clip(round(Φ0 + (α/r)AB))`` with scale ``s`` (``merge``),
with no inference overhead. ``A = 0`` makes step 0 equal round-to-nearest of ``Φ0``.

The down-cast ``φ`` (``phi``):

- ``fixed_point8`` (default): int8 fixed point Q(b).(8−b), ``φ(x) = round(2^(8−b)·clip(x, qmin, qmax))``,
  ``φ⁻¹(y) = y / 2^(8−b)``; exact for values on that grid; symmetric signed grids only;
- ``bf16``; ``fp32`` (no down-cast, for reference);
- ``int``: ``Φ0`` rounded to integers and stored packed at b bits (``lowbit.export.pack``), the paper's
  lowest-memory variant; step 0 is then exactly round-to-nearest of ``W0/s0``.

With ``checkpoint=True`` (default) building ``Ŵ`` and the matmul are one autograd function that
saves only the layer input and recomputes ``Ŵ`` in the backward pass, so no full-size intermediate
(upcast Φ0, AB, the rounded matrix, Ŵ) is stored between the passes. Its backward is the STE
gradient written out (``∂L/∂(AB) = (α/r)·s·∂L/∂Ŵ ⊙ 1[qmin ≤ round(·) ≤ qmax]``, ``∂L/∂s = Σ ∂L/∂Ŵ ⊙
W_int``), equal to autograd's through the plain path (tested); it does what the paper's
``torch.utils.checkpoint`` wrapper does at about a third of the per-layer operator count, which is
what a small model's step time is made of. ``checkpoint=False`` is the plain autograd path.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import Tensor, nn

from lowbit.config import QuantSpec
from lowbit.errors import ConfigError
from lowbit.export.intmodules import IntLinear, _IntWeight, dequantize_weight, int_dtype
from lowbit.export.pack import pack, unpack
from lowbit.llm_config import LLM_TARGETS
from lowbit.quant import functional as F
from lowbit.quant.calibrate import init_range
from lowbit.quant.quantizer import Quantizer

__all__ = [
    "LowRankQuantLinear",
    "to_fixed_point",
    "from_fixed_point",
    "prepare_lrqat",
    "merge",
    "QLoRALinear",
    "LLAMA_TARGETS",
    "PHI_KINDS",
    "METHOD_KINDS",
]

LLAMA_TARGETS = LLM_TARGETS  # the seven linears of a LLaMA decoder block
PHI_KINDS = ("fixed_point8", "bf16", "fp32", "int")


def to_fixed_point(x: Tensor, bits: int) -> Tensor:
    """``int8(round(2^(8−b)·clip(x, −2^(b−1), 2^(b−1)−1)))``: Q(b).(8−b) fixed point of grid values."""
    qmin, qmax = F.int_range(bits, True)
    return torch.round(x.clamp(qmin, qmax) * 2.0 ** (8 - bits)).to(torch.int8)


def from_fixed_point(y: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``y / 2^(8−b)`` as ``dtype``: the inverse of ``to_fixed_point`` on its grid (exact)."""
    return y.to(dtype) * 2.0 ** (bits - 8)


def _scale_grad(grad_w: Tensor, w_int: Tensor, scale: Tensor, granularity: str, group_size: int | None) -> Tensor:
    """``Σ ∂L/∂Ŵ ⊙ W_int`` summed into the scale's shape (the gradient of ``dequantize_weight`` to ``s``)."""
    prod = grad_w * w_int
    if granularity == "group":
        assert group_size is not None
        return prod.reshape(prod.shape[0], -1, group_size).sum(-1).reshape(scale.shape)
    if granularity == "channel":
        return prod.sum(1).reshape(scale.shape)
    return prod.sum().reshape(scale.shape)


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
        w = dequantize_weight(w_int, s_pos, None, *layer._qlayout())
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
        w = dequantize_weight(w_int, s_pos, None, gran, 0, gs)
        grad_x = grad_y @ w.to(grad_y.dtype) if ctx.needs_input_grad[0] else None
        grad_a = grad_b = grad_s = grad_bias = None
        if any(ctx.needs_input_grad[1:4]):
            gy = grad_y.reshape(-1, grad_y.shape[-1]).float()
            grad_w = gy.t() @ x.reshape(-1, x.shape[-1]).float()  # (out, in)
            if ctx.needs_input_grad[3]:
                sign = torch.where(scale < 0, -1.0, 1.0)  # positive_scale's gradient
                grad_s = _scale_grad(grad_w, w_int, scale, gran, gs) * sign
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
    ) -> None:
        super().__init__()
        out_f, in_f = linear.weight.shape
        if phi not in PHI_KINDS:
            raise ConfigError(f"phi={phi!r} is not allowed: use one of {', '.join(PHI_KINDS)}")
        if phi == "fixed_point8" and not (spec.symmetric and spec.signed in (None, True)):
            raise ConfigError("phi='fixed_point8' needs a symmetric signed grid: use phi='bf16' for asymmetric ones")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= min(out_f, in_f):
            raise ConfigError(
                f"rank={rank!r} is not allowed for a {out_f}×{in_f} layer: use 1..{min(out_f, in_f)} (0: scales only)"
            )
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.alpha, self.phi, self.use_checkpoint = rank, float(alpha), phi, checkpoint
        w0 = linear.weight.detach().float()
        self.weight_quantizer = Quantizer(spec, (out_f, in_f)).to(w0.device)
        with torch.no_grad():
            init_range(self.weight_quantizer, w0)
            self.weight_quantizer.initialized.fill_(True)
        q = self.weight_quantizer
        qmin, qmax = q.int_grid()
        s0, _ = q.qparams(w0, qmax)
        with torch.no_grad():
            ratio = q._view(w0) / F.positive_scale(s0, F.SCALE_EPS)  # W0 / s0 in the quantizer's view
            ratio = ratio.reshape(out_f, in_f)
        if phi == "fixed_point8":
            self.register_buffer("phi0", to_fixed_point(ratio, spec.bits))
        elif phi == "bf16":
            self.register_buffer("phi0", ratio.clamp(qmin, qmax).to(torch.bfloat16))
        elif phi == "fp32":
            self.register_buffer("phi0", ratio.clamp(qmin, qmax).contiguous())
        else:  # int: round-to-nearest integers, packed at b bits
            ints = torch.round(ratio).clamp(qmin, qmax).to(torch.int32)
            self.register_buffer("phi0", pack(ints, spec.bits, bool(q.signed)))
        self.lora_a = nn.Parameter(torch.zeros(out_f, rank, device=w0.device), requires_grad=rank > 0)
        self.lora_b = nn.Parameter(torch.empty(rank, in_f, device=w0.device), requires_grad=rank > 0)
        if rank > 0:
            nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def phi0_float(self) -> Tensor:
        """``Φ0`` upcast to float32, (out, in)."""
        q = self.weight_quantizer
        bits = q.nbits
        if self.phi == "fixed_point8":
            return from_fixed_point(self.phi0, bits)
        if self.phi == "int":
            n = self.out_features * self.in_features
            signed = q.int_grid()[0] < 0
            return unpack(self.phi0, bits, signed, n).reshape(self.out_features, self.in_features).float()
        return self.phi0.float()

    def int_weight(self) -> Tensor:
        """``clip(round_STE(Φ0 + (α/r)·A·B), qmin, qmax)`` (float dtype, STE gradients to A and B)."""
        qmin, qmax = self.weight_quantizer.int_grid()
        t = self.phi0_float()
        if self.rank > 0:
            t = t + (self.alpha / self.rank) * (self.lora_a @ self.lora_b)
        return F.round_ste(t).clamp(qmin, qmax)

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
        q = self.weight_quantizer
        if self.use_checkpoint and torch.is_grad_enabled():
            return _LowRankQuantLinearFn.apply(x, self.lora_a, self.lora_b, q.scale, self.bias, self)
        # the same dequantization the merged IntLinear uses, so merging is exact
        w = dequantize_weight(
            self.int_weight(), F.positive_scale(q.scale, F.SCALE_EPS), None, q.granularity, q.axis, q.group_size
        )
        return nn.functional.linear(x, w.to(x.dtype), self.bias)

    @torch.no_grad()
    def to_int(self) -> Tensor:
        """The merged integers ``W_int`` (int8, or int16 for unsigned 8-bit), exactly those ``forward`` uses."""
        qmin, qmax = self.weight_quantizer.int_grid()
        return self.int_weight().round().to(int_dtype(qmin, qmax))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, phi={self.phi}"


class QLoRALinear(nn.Module):
    """The QLoRA-style baseline: frozen round-to-nearest integer weights, float adapters *outside* the grid.

    ``y = s0·W_int·x + (α/r)·A·(B·x)``; only ``A`` and ``B`` train. Unlike LR-QAT it does not merge into
    integers without re-quantizing (and losing what the adapters learned below the grid step).
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(linear.weight.shape):
            raise ConfigError(f"rank={rank!r} is not allowed for a {tuple(linear.weight.shape)} layer")
        base = LowRankQuantLinear(linear, spec, 0, alpha, "fp32", checkpoint=False)  # round-to-nearest
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(alpha)
        self.weight_quantizer = base.weight_quantizer
        self.weight_quantizer.scale.requires_grad_(False)
        self.register_buffer("weight_int", base.to_int())
        dev = self.weight_int.device
        self.lora_a = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        self.lora_b = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        nn.init.kaiming_uniform_(self.lora_b, a=math.sqrt(5))
        self.bias = base.bias
        q = self.weight_quantizer
        scale = F.positive_scale(q.scale.detach(), F.SCALE_EPS)
        w = dequantize_weight(self.weight_int, scale, None, q.granularity, q.axis, q.group_size)
        self.register_buffer("weight", w, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = nn.functional.linear(x, self.weight.to(x.dtype), bias)
        lora = nn.functional.linear(nn.functional.linear(x, self.lora_b.to(x.dtype)), self.lora_a.to(x.dtype))
        return y + (self.alpha / self.rank) * lora


METHOD_KINDS = ("lrqat", "scales_only", "qlora")


def prepare_lrqat(
    model: nn.Module,
    bits: int = 4,
    rank: int = 32,
    alpha: float = 1.0,
    granularity: str = "channel",
    group_size: int | None = None,
    targets: tuple[str, ...] | list[str] = LLAMA_TARGETS,
    phi: str = "fixed_point8",
    init: str = "lp",
    checkpoint: bool = True,
    method: str = "lrqat",
) -> nn.Module:
    """Swap the linears whose names match ``targets`` (globs) for LR-QAT layers; freeze everything else.

    ``method``: ``lrqat`` (adapters ``lora_a``, ``lora_b`` and the scales train), ``scales_only``
    (PEQA-style: rank 0, only the scales train), ``qlora`` (``QLoRALinear``: frozen round-to-nearest
    weights and scales, float adapters outside the grid).
    """
    if method not in METHOD_KINDS:
        raise ConfigError(f"method={method!r} is not allowed: use one of {', '.join(METHOD_KINDS)}")
    from lowbit.api import _set_submodule

    spec = QuantSpec(bits=bits, granularity=granularity, group_size=group_size, init=init)
    names = [n for n, m in model.named_modules() if n]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, t) for t in targets)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not chosen:
        raise ConfigError(
            f"targets={list(targets)} match no module: linear layers are {linears[:12]}"
            + (" ..." if len(linears) > 12 else "")
        )
    modules = dict(model.named_modules())
    for n in chosen:
        if not isinstance(modules[n], nn.Linear):
            kind = type(modules[n]).__name__
            raise ConfigError(f"target {n!r} is a {kind}, not nn.Linear: linears are {linears[:12]}")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        try:
            if method == "qlora":
                layer: nn.Module = QLoRALinear(modules[n], spec, rank, alpha)
            else:
                r = 0 if method == "scales_only" else rank
                layer = LowRankQuantLinear(modules[n], spec, r, alpha, phi, checkpoint)
        except ValueError as e:  # e.g. a group size that does not divide the layer
            raise ConfigError(f"layer {n!r}: {e}") from None
        _set_submodule(model, n, layer.to(modules[n].weight.device))
    return model


@torch.no_grad()
def merge(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every ``LowRankQuantLinear`` by an ``IntLinear`` holding ``W_int`` and the scale ``s``.

    The merged model's outputs equal the LR-QAT model's (same integers, same scales, same float path).
    """
    import copy

    from lowbit.api import _set_submodule

    out = model if inplace else copy.deepcopy(model)
    for name, m in [(n, m) for n, m in out.named_modules() if isinstance(m, LowRankQuantLinear)]:
        q = m.weight_quantizer
        scale, _ = q.export_qparams()
        qweight = _IntWeight(
            m.to_int(), scale, None, int(q.bits), bool(q.signed), q.granularity, q.axis, q.group_size, None
        )
        bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        _set_submodule(out, name, IntLinear(m.in_features, m.out_features, qweight, bias))
    return out.eval()
