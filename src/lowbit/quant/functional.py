"""Pure quantization math: no modules, no state.

The uniform affine quantizer with scale ``s > 0``, integer zero point ``z`` and grid ``[qmin, qmax]``::

    x_int = clip(round(x * (1/s)) + z, qmin, qmax)
    q(x)  = s * (x_int - z)

``round`` rounds half to even and ``x * (1/s)`` is computed exactly as PyTorch's own fake-quant kernels
compute it, so ``fake_quantize`` equals ``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine`` bit for bit wherever those apply.

Gradients (straight-through estimator on ``round``; LSQ / LSQ+ for the scale and zero point):

    dq/dx = 1 inside the grid, 0 where clipped
    dq/ds = round(x/s) - x/s inside,   qmin - z or qmax - z where clipped
    dq/dz = 0 inside,                  -s where clipped

``fake_quantize`` is the fast path used in training: one autograd node whose backward needs only
``dx = g * inside`` and, for the scale, the identity ``sum(g * dq/ds) = (sum(g*q) - sum(dx*x)) / s``
(since ``q/s = x_int - z`` everywhere and ``x/s`` is subtracted only inside). That makes the backward
two reductions and one multiply instead of a chain of elementwise ops.

``quantize_ste`` is the composed path that exposes the integers (with straight-through gradients) so
methods can act on them; ``dequantize(quantize(x))`` equals ``fake_quantize(x)`` exactly (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quant import kernels

__all__ = [
    "int_range",
    "round_ste",
    "sign_ste",
    "grad_scale",
    "positive_scale",
    "fake_quantize",
    "quantize_ste",
    "quantize",
    "dequantize",
    "lsq_grad_factor",
    "zero_point_int",
    "dequantize_weight",
    "pad_groups",
    "int_dtype",
    "SCALE_EPS",
]


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` of a ``bits``-wide signed or unsigned integer."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is not allowed: use an integer from 1 to 16")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; gradient 1 (straight-through)."""
    return x + (torch.round(x) - x).detach()


def sign_ste(x: Tensor, grad: str = "clip") -> Tensor:
    """``sign`` mapping 0 to +1, with a straight-through gradient: ``clip``, ``1{|x| <= 1}`` (hard tanh), or
    ``approxsign``, Bi-Real Net's ``(2 − 2|x|)·1{|x| <= 1}`` (the derivative of ``2x − x|x|`` on [−1, 1])."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    soft = x.clamp(-1.0, 1.0)
    if grad == "approxsign":
        soft = 2 * soft - soft * soft.abs()
    elif grad != "clip":
        raise ValueError(f"grad={grad!r} is not allowed: use clip or approxsign")
    return soft + (hard - soft).detach()


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor``."""
    if factor == 1.0:
        return x
    scaled = x * factor
    # x + (scaled - scaled) is exactly x; (x - scaled) + scaled is not (it differs by an ulp)
    return x.detach() + (scaled - scaled.detach())


def positive_scale(scale: Tensor, eps: float = 1e-8) -> Tensor:
    """``max(|scale|, eps)`` with the gradient of ``|scale|`` (sign 0 counts as +1), so it never sticks."""
    sign = torch.where(scale < 0, -1.0, 1.0).detach()
    s = scale * sign
    return s + (s.clamp_min(eps) - s).detach()


def lsq_grad_factor(numel_per_scale: int, qmax: float) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * qmax)`` (Esser et al., 2020)."""
    return 1.0 / float(max(numel_per_scale * max(qmax, 1.0), 1.0)) ** 0.5


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the dimensions that were broadcast from ``shape``."""
    if t.shape == shape:
        return t
    if len(shape) == 0 or shape.numel() == 1:
        return t.sum().reshape(shape)
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1))


SCALE_EPS = 1e-8


class _FakeQuantize(torch.autograd.Function):
    """LSQ / LSQ+ fake quantization as one autograd node of torch ops (see the module docstring), where
    the fused CPU kernel does not apply (``fake_quantize`` picks).

    ``scale`` arrives raw: the node uses ``s = max(|scale|, eps)`` and passes the gradient back through
    ``|.|`` (sign 0 counts as +1, so a scale at 0 still moves). ``qmin``/``qmax`` are Python numbers.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: float, qmax: float
    ) -> Tensor:
        ctx.has_zero_point = zero_point is not None
        s = scale.abs().clamp_min(SCALE_EPS)
        t = torch.mul(x, torch.reciprocal(s))  # x * (1/s), exactly as torch's fake-quant kernels
        t.round_()
        if zero_point is not None:
            t.add_(zero_point)
        y = t.clamp(qmin, qmax)
        inside = torch.eq(t, y)  # not clipped: the STE passes the gradient here
        del t
        if zero_point is not None:
            y.sub_(zero_point)
        y.mul_(s)
        ctx.save_for_backward(x, scale, zero_point, y, inside, s)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        need_s = ctx.needs_input_grad[1]
        need_z = ctx.has_zero_point and ctx.needs_input_grad[2]
        d_scale = d_zero = None
        x, scale, zero_point, y, inside, s = ctx.saved_tensors
        dx = g * inside
        if need_s:
            if s.numel() == 1:
                d_s = ((_dot(g, y) - _dot(dx, x)) / s).reshape(s.shape)
            else:
                d_s = _reduce_to(g * y - dx * x, s.shape) / s
            d_scale = torch.where(scale < 0, -d_s, d_s)
        if need_z:
            # clipped elements only: d/dz = -s
            if zero_point.numel() == 1:
                d_zero = ((dx.sum() - g.sum()) * s).reshape(zero_point.shape)
            else:
                d_zero = _reduce_to(dx - g, zero_point.shape) * s
        return dx, d_scale, d_zero, None, None


_EMPTY = torch.empty(0)


def _fused_layout(x: Tensor, s: Tensor, zero_point: Tensor | None) -> tuple[int, int, int] | None:
    """``(outer, C, inner)`` when the fused kernel applies: float32 CPU contiguous ``x``, and a scale
    that varies along one contiguous block of dimensions (per tensor, channel or group). Never under
    ``torch.compile``: the kernel is a pybind call that dynamo cannot trace (a graph break), and the torch
    ops it replaces give the same values and are what the compiler fuses."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous() or x.numel() == 0:
        return None
    if s.dtype != torch.float32:
        return None
    if zero_point is not None and (zero_point.shape != s.shape or zero_point.dtype != s.dtype):
        return None
    if torch.compiler.is_compiling() or kernels.fused() is None:
        return None
    if s.numel() == 1:
        outer = x.shape[0] if x.dim() > 0 else 1
        return outer, 1, x.numel() // max(outer, 1)
    if s.dim() > x.dim():
        return None
    shape = (1,) * (x.dim() - s.dim()) + tuple(s.shape)
    varying = [i for i, n in enumerate(shape) if n != 1]
    a, b = varying[0], varying[-1] + 1
    if any(shape[i] != x.shape[i] for i in range(a, b)):
        return None
    outer = int(torch.Size(x.shape[:a]).numel())
    inner = int(torch.Size(x.shape[b:]).numel())
    return outer, s.numel(), inner


def _as_tensor(v: Tensor | float | int, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v if v.dtype == like.dtype else v.to(dtype=like.dtype)
    return torch.tensor(float(v), dtype=like.dtype, device=like.device)


def _as_number(v: Tensor | float | int) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def zero_point_int(zero_point: Tensor | float | int | None, qmin: float, qmax: float) -> Tensor | None:
    """Clamp to the grid and round (half to even), with a straight-through gradient."""
    if zero_point is None:
        return None
    if not isinstance(zero_point, Tensor):
        if zero_point == 0:
            return None
        zero_point = torch.tensor(float(zero_point))
    # clamp, not maximum/minimum: those split the gradient in half at ties (z == qmin is common)
    return round_ste(zero_point.clamp(qmin, qmax))


def fake_quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | int | None,
    qmin: Tensor | int,
    qmax: Tensor | int,
) -> Tensor:
    """``s * (clip(round(x/s) + z, qmin, qmax) - z)`` with LSQ gradients for ``scale`` and ``zero_point``.

    ``scale`` and ``zero_point`` broadcast against ``x`` (shape ``()`` per tensor, ``(C, 1, 1, 1)`` per
    output channel of a conv weight, ...). ``s = max(|scale|, 1e-8)``: a scale is used by magnitude.
    """
    lo, hi = _as_number(qmin), _as_number(qmax)
    z = zero_point_int(zero_point, lo, hi)
    scale = _as_tensor(scale, x)
    layout = _fused_layout(x, scale, z)
    if layout is not None:  # one C++ autograd node (kernels.py), no Python in its backward
        return kernels.fused().fake_quantize(x, scale, _EMPTY if z is None else z, *layout, lo, hi)  # type: ignore[union-attr]
    return _FakeQuantize.apply(x, scale, z, lo, hi)


def quantize_ste(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | int | None,
    qmin: Tensor | int,
    qmax: Tensor | int,
) -> Tensor:
    """Integers ``clip(round(x/s) + z, qmin, qmax)`` as a float tensor, differentiable (STE, LSQ).

    Uses ``s = max(|scale|, 1e-8)`` like ``fake_quantize``, so ``dequantize`` of these equals it exactly.
    """
    lo, hi = _as_number(qmin), _as_number(qmax)
    z = zero_point_int(zero_point, lo, hi)
    t = round_ste(x * torch.reciprocal(positive_scale(_as_tensor(scale, x), SCALE_EPS)))
    if z is not None:
        t = t + z
    return t.clamp(lo, hi)  # inclusive STE mask; maximum/minimum would halve it at qmin/qmax


def quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | int | None,
    qmin: Tensor | int,
    qmax: Tensor | int,
) -> Tensor:
    """Integers ``clip(round(x/s) + z, qmin, qmax)`` as an ``int32`` tensor (no gradient)."""
    with torch.no_grad():
        return quantize_ste(x, scale, zero_point, qmin, qmax).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor | float, zero_point: Tensor | float | int | None = None) -> Tensor:
    """``s * (q - z)`` as float32 (``zero_point`` is rounded like in ``fake_quantize``)."""
    scale_t = scale if isinstance(scale, Tensor) else torch.tensor(float(scale))
    qf = q.to(scale_t.dtype if scale_t.is_floating_point() else torch.float32)
    if zero_point is not None:
        z = zero_point if isinstance(zero_point, Tensor) else torch.tensor(float(zero_point))
        qf = qf - torch.round(z.to(qf.dtype))
    return qf * scale_t


def offset_float16(scale: Tensor, zero_point: Tensor) -> Tensor:
    """``m = −s·z`` rounded to float16 (straight through): the minimum a GGUF ``Q4_1`` block stores."""
    m = -(scale * zero_point)
    return m + (m.detach().to(torch.float16).to(m.dtype) - m.detach())


def dequantize_weight(
    q: Tensor, scale: Tensor, zero_point: Tensor | None, granularity: str, axis: int, group_size: int | None,
    offset16: bool = False,
) -> Tensor:  # fmt: skip
    """``s * (q - z)`` with ``scale`` in a quantizer's stored shape, broadcast as the quantizer broadcasts it.

    The one dequantization of weights: integer modules, the LR-QAT layer and its merge all call it, so
    what is trained equals what is exported bit for bit.
    """
    qf = q.to(torch.float32)
    if granularity == "group":  # (rows, groups, group_size), a ragged last group zero-padded (Quantizer.view)
        assert group_size is not None
        view = pad_groups(qf, scale.shape[-1], group_size)
        s = scale.unsqueeze(-1)
        z = zero_point.unsqueeze(-1) if zero_point is not None else None
    else:
        view = qf
        if granularity == "channel":
            shape = [1] * q.dim()
            shape[axis if axis >= 0 else q.dim() + axis] = -1
            s = scale.reshape(shape)
            z = zero_point.reshape(shape) if zero_point is not None else None
        else:
            s, z = scale, zero_point
    if offset16 and z is not None:  # s·q + float16(−s·z): GGUF Q4_1's arithmetic (``offset: float16``)
        out = view * s + offset_float16(s, z)
    else:
        out = (view - z) * s if z is not None else view * s
    if granularity == "group":  # drop a ragged last group's padding
        out = out.reshape(q.shape[0], -1)[:, : q[0].numel()]
    return out.reshape(q.shape)


def pad_groups(t: Tensor, groups: int, group_size: int) -> Tensor:
    """``t`` (rows, ...) as ``(rows, groups, group_size)``, its rows zero-padded to ``groups · group_size``."""
    flat = t.reshape(t.shape[0], -1)
    if (pad := groups * group_size - flat.shape[1]) > 0:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(t.shape[0], groups, group_size)


def int_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest torch integer dtype that holds the grid ``[qmin, qmax]`` (int8, else int16)."""
    return torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16
