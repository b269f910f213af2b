"""How LR-QAT's frozen ``Φ0`` (a weight in grid units, ``W0/s0 + z0``) is stored: one codec per kind.

- ``fixed_point8``: int8 fixed point Q(b).(8−b), ``φ(x) = round(2^(8−b)·clip(x, qmin, qmax))``,
  ``φ⁻¹(y) = y / 2^(8−b)``; exact for values on that grid. An unsigned grid (``0..2^b−1``) is shifted down
  by ``2^(b−1)`` into the signed one and back on decoding.
- ``bf16`` / ``fp32``: clipped to the grid, stored as that float dtype;
- ``int``: rounded to integers and packed at b bits (``lowbit.export.pack``), the lowest-memory storage.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from lowbit.export.pack import pack, unpack
from lowbit.quant import functional as F
from lowbit.spec import QuantSpec

__all__ = ["PHI_CODECS", "PhiCodec", "to_fixed_point", "from_fixed_point"]


def to_fixed_point(x: Tensor, bits: int) -> Tensor:
    """``int8(round(2^(8−b)·clip(x, −2^(b−1), 2^(b−1)−1)))``: Q(b).(8−b) fixed point of grid values."""
    qmin, qmax = F.int_range(bits, True)
    return torch.round(x.clamp(qmin, qmax) * 2.0 ** (8 - bits)).to(torch.int8)


def from_fixed_point(y: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """``y / 2^(8−b)`` as ``dtype``: the inverse of ``to_fixed_point`` on its grid (exact)."""
    return y.to(dtype) * 2.0 ** (bits - 8)


class PhiCodec(Protocol):
    def check(self, spec: QuantSpec) -> None: ...
    def encode(self, t: Tensor, bits: int, signed: bool) -> Tensor: ...
    def decode(self, stored: Tensor, bits: int, signed: bool, shape: tuple[int, int]) -> Tensor: ...


class FixedPoint8:
    """int8 Q(b).(8−b): exact for grid values with up to 8−b fractional bits. An unsigned grid (asymmetric,
    ``0..2^b−1``) is stored shifted down by ``2^(b−1)`` into the signed one, and shifted back on decoding."""

    def check(self, spec: QuantSpec) -> None:
        pass

    def encode(self, t: Tensor, bits: int, signed: bool) -> Tensor:
        return to_fixed_point(t - (0 if signed else 2 ** (bits - 1)), bits)

    def decode(self, stored: Tensor, bits: int, signed: bool, shape: tuple[int, int]) -> Tensor:
        return from_fixed_point(stored, bits) + (0 if signed else 2 ** (bits - 1))


class FloatStorage:
    """``Φ0`` clipped to the grid and stored as a float dtype (bf16, or fp32 for reference)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def check(self, spec: QuantSpec) -> None:
        pass

    def encode(self, t: Tensor, bits: int, signed: bool) -> Tensor:
        qmin, qmax = F.int_range(bits, signed)
        return t.clamp(qmin, qmax).to(self.dtype).contiguous()

    def decode(self, stored: Tensor, bits: int, signed: bool, shape: tuple[int, int]) -> Tensor:
        return stored.float()


class PackedInt:
    """``Φ0`` rounded to integers and packed at b bits: the lowest-memory storage."""

    def check(self, spec: QuantSpec) -> None:
        pass

    def encode(self, t: Tensor, bits: int, signed: bool) -> Tensor:
        qmin, qmax = F.int_range(bits, signed)
        return pack(torch.round(t).clamp(qmin, qmax).to(torch.int32), bits, signed)

    def decode(self, stored: Tensor, bits: int, signed: bool, shape: tuple[int, int]) -> Tensor:
        return unpack(stored, bits, signed, shape[0] * shape[1]).reshape(shape).float()


PHI_CODECS: dict[str, PhiCodec] = {
    "fixed_point8": FixedPoint8(),
    "bf16": FloatStorage(torch.bfloat16),
    "fp32": FloatStorage(torch.float32),
    "int": PackedInt(),
}
