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
]


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid ``(qmin, qmax)`` of a ``bits``-wide signed or unsigned integer."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is not allowed: use an integer from 1 to 16")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def int_range_tensor(bits: Tensor, signed: Tensor) -> tuple[Tensor, Tensor]:
    """``int_range`` on 0-d tensors (float results), so bit widths can be state without a host sync."""
    bits_f = bits.to(torch.float32)
    half = torch.exp2(bits_f - 1)
    qmin = torch.where(signed, -half, torch.zeros_like(half))
    qmax = torch.where(signed, half - 1, 2 * half - 1)
    return qmin, qmax


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; gradient 1 (straight-through)."""
    return x + (torch.round(x) - x).detach()


def sign_ste(x: Tensor) -> Tensor:
    """``sign`` mapping 0 to +1, with the clipped straight-through gradient ``1{|x| <= 1}``."""
    hard = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    soft = x.clamp(-1.0, 1.0)
    return soft + (hard - soft).detach()


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor``."""
    if factor == 1.0:
        return x
    scaled = x * factor
    # x + (scaled - scaled) is exactly x; (x - scaled) + scaled is not (it differs by an ulp)
    return x.detach() + (scaled - scaled.detach())


def positive_scale(scale: Tensor, eps: float = 1e-8) -> Tensor:
    """``max(|scale|, eps)`` with the gradient of ``|scale|``, so a scale can never stick at the floor."""
    s = scale.abs()
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


class _FakeQuantize(torch.autograd.Function):
    """LSQ / LSQ+ fake quantization as one autograd node (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: Tensor, qmax: Tensor
    ) -> Tensor:
        t = x * torch.reciprocal(scale)
        t.round_()
        if zero_point is not None:
            t.add_(zero_point)
        inside = (t >= qmin) & (t <= qmax)
        t.clamp_(qmin, qmax)
        if zero_point is not None:
            t.sub_(zero_point)
        y = t.mul_(scale)
        ctx.save_for_backward(x, y, inside, scale, zero_point)
        ctx.has_zero_point = zero_point is not None
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, y, inside, scale, zero_point = ctx.saved_tensors
        dx = g * inside
        d_scale = d_zero = None
        if ctx.needs_input_grad[1]:
            if scale.numel() == 1:
                d_scale = ((_dot(g, y) - _dot(dx, x)) / scale).reshape(scale.shape)
            else:
                d_scale = _reduce_to(g * y - dx * x, scale.shape) / scale
        if ctx.has_zero_point and ctx.needs_input_grad[2]:
            # clipped elements only: d/dz = -s
            if zero_point.numel() == 1:
                d_zero = ((dx.sum() - g.sum()) * scale).reshape(zero_point.shape)
            else:
                d_zero = _reduce_to(dx - g, zero_point.shape) * scale
        return dx, d_scale, d_zero, None, None


def _as_tensor(v: Tensor | float | int, like: Tensor) -> Tensor:
    if isinstance(v, Tensor):
        return v.to(dtype=like.dtype)
    return torch.tensor(float(v), dtype=like.dtype, device=like.device)


def _zero_point_int(zero_point: Tensor | float | int | None, qmin: Tensor, qmax: Tensor) -> Tensor | None:
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
    output channel of a conv weight, ...). ``scale`` must be positive (see ``positive_scale``).
    """
    scale_t = _as_tensor(scale, x)
    qmin_t, qmax_t = _as_tensor(qmin, x), _as_tensor(qmax, x)
    z = _zero_point_int(zero_point, qmin_t, qmax_t)
    return _FakeQuantize.apply(x, scale_t, z, qmin_t, qmax_t)


def quantize_ste(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | float | int | None,
    qmin: Tensor | int,
    qmax: Tensor | int,
) -> Tensor:
    """Integers ``clip(round(x/s) + z, qmin, qmax)`` as a float tensor, differentiable (STE, LSQ)."""
    scale_t = _as_tensor(scale, x)
    qmin_t, qmax_t = _as_tensor(qmin, x), _as_tensor(qmax, x)
    z = _zero_point_int(zero_point, qmin_t, qmax_t)
    t = round_ste(x * torch.reciprocal(scale_t))
    if z is not None:
        t = t + z
    return t.clamp(qmin_t, qmax_t)  # inclusive STE mask; maximum/minimum would halve it at qmin/qmax


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
