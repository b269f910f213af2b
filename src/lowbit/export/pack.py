"""Dense bit packing of low-bit integers, the layout of lowbit's packed tensors on disk (safetensors).

Format (a file format: changing it needs a new ``format_version``):

- A tensor of ``n`` integers on the ``bits``-wide grid (``bits`` in 1..8) of
  ``lowbit.quant.functional.int_range(bits, signed)``, i.e. signed ``[-2^(b-1), 2^(b-1) - 1]`` or unsigned
  ``[0, 2^b - 1]``, is flattened in row-major (C) order; the caller stores the shape.
- Value ``i`` is stored as the unsigned code ``c_i = v_i - qmin`` in ``[0, 2^b - 1]``.
- The codes form one little-endian bit stream, least significant bit first: bit ``k`` of ``c_i`` is
  stream bit ``i * b + k``, and stream bit ``j`` is bit ``j % 8`` (value ``2^(j % 8)``) of byte ``j // 8``.
  Codes straddle byte boundaries when ``8 % b != 0`` (3, 5, 6, 7 bits).
- The result is ``ceil(n * b / 8)`` bytes (``packed_nbytes``), stored as a 1-D ``uint8`` tensor. The
  ``8 * nbytes - n * b`` padding bits at the top of the last byte are zero; ``unpack`` rejects nonzero
  padding and a wrong byte count with ``FormatError``.
- Examples: 4 bits puts value ``2i`` in the low nibble and ``2i + 1`` in the high nibble of byte ``i``;
  3 bits puts ``c_0`` in bits 0-2 of byte 0, ``c_1`` in bits 3-5, ``c_2`` in bits 6-7 of byte 0 and bit 0
  of byte 1.
- Ternary weights {-1, 0, 1} are 2-bit signed (codes 1, 2, 3). Binary weights {-1, +1} use ``pack_sign``:
  1 bit each, ``+1 -> 1``, ``-1 -> 0``, in the same LSB-first stream.

``unpack`` returns int8 when the grid fits int8 (every signed width, unsigned up to 7 bits) and int16
for unsigned 8 bits, the rule of ``lowbit.export.intmodules``.

Implementation (no loop over values): codes are grouped into words of whole bytes, ``8 / b`` codes per
uint8 for 1, 2 and 4 bits, 8 codes per int64 (``b`` bytes, at most 56 bits) for 3, 5, 6 and 7 bits; a
word is ``sum_k c_k << (k * b)`` and its bytes are read out low byte first. Unpacking runs the same steps
backwards; 8 bits is a plain copy. Work goes in chunks of ``CHUNK_VALUES`` values, a multiple of 8, so
each chunk is a whole number of bytes and chunked output equals one-shot output, while temporary memory
stays bounded for LLM-size weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lowbit.errors import FormatError
from lowbit.quant.functional import int_range

__all__ = ["packed_nbytes", "pack", "unpack", "pack_sign", "unpack_sign"]

CHUNK_VALUES = 1 << 18  # values per chunk, a multiple of 8: temporaries of a few MiB stay in cache
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} is not allowed for packing: use one of 1, 2, 3, 4, 5, 6, 7, 8")


def _check_numel(numel: int) -> None:
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise ValueError(f"numel={numel!r} is not allowed: use a non-negative integer")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` values of ``bits`` bits occupy: ``ceil(numel * bits / 8)``."""
    _check_bits(bits)
    _check_numel(numel)
    return (numel * bits + 7) // 8


def _unpacked_dtype(bits: int, signed: bool) -> torch.dtype:
    qmin, qmax = int_range(bits, signed)
    return torch.int8 if qmin >= -128 and qmax <= 127 else torch.int16


def _word_layout(bits: int) -> tuple[int, torch.dtype]:
    """Codes per word and the word dtype: a word is ``per * bits / 8`` whole bytes."""
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, so the word is one uint8
        return 8 // bits, torch.uint8
    return 8, torch.int64  # 3, 5, 6, 7 bits: 8 codes fill `bits` bytes, at most 56 bits of an int64


def _pad(x: Tensor, size: int) -> Tensor:
    return x if x.numel() == size else torch.cat([x, x.new_zeros(size - x.numel())])


def _pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes in ``[0, 2^bits)`` (1-D) -> ``packed_nbytes(len, bits)`` bytes."""
    n = codes.numel()
    if bits == 8:
        return codes
    per, dtype = _word_layout(bits)
    m = -(-n // per)
    words = _pad(codes, m * per).view(m, per).to(dtype)
    shifts = torch.arange(per, dtype=dtype, device=codes.device) * bits
    words = (words << shifts).sum(dim=1, dtype=dtype)  # (m,); the fields are disjoint, so sum == or
    if dtype != torch.uint8:
        byte_shifts = torch.arange(bits, dtype=dtype, device=codes.device) * 8
        words = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).flatten()  # (m * bits,)
    return words[: packed_nbytes(n, bits)]  # the dropped bytes hold only zero padding


def _unpack_codes(data: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of ``_pack_codes``: ``packed_nbytes(n, bits)`` bytes -> ``n`` uint8 codes."""
    if bits == 8:
        return data
    per, dtype = _word_layout(bits)
    m = -(-n // per)
    words = _pad(data, m * per * bits // 8)
    if dtype != torch.uint8:
        byte_shifts = torch.arange(bits, dtype=dtype, device=data.device) * 8
        words = (words.view(m, bits).to(dtype) << byte_shifts).sum(dim=1)  # (m,)
    shifts = torch.arange(per, dtype=dtype, device=data.device) * bits
    codes = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)  # (m, per)
    return codes.flatten()[:n].to(torch.uint8)


def _chunk_values() -> int:
    if CHUNK_VALUES <= 0 or CHUNK_VALUES % 8:
        raise ValueError(f"CHUNK_VALUES={CHUNK_VALUES} must be a positive multiple of 8")
    return CHUNK_VALUES


def _pack_chunked(flat: Tensor, bits: int, to_codes: Callable[[Tensor], Tensor]) -> Tensor:
    n = flat.numel()
    out = torch.empty(packed_nbytes(n, bits), dtype=torch.uint8, device=flat.device)
    step = _chunk_values()
    for start in range(0, n, step):  # a chunk of `step` values is exactly step * bits / 8 bytes
        packed = _pack_codes(to_codes(flat[start : start + step]), bits)
        offset = start * bits // 8
        out[offset : offset + packed.numel()] = packed
    return out


def pack(q: Tensor, bits: int, signed: bool) -> Tensor:
    """Pack integers on the ``bits``-wide grid (any integer dtype, any shape) into 1-D uint8 (see module)."""
    _check_bits(bits)
    if q.dtype not in _INT_DTYPES:
        allowed = ", ".join(str(d) for d in _INT_DTYPES)
        raise ValueError(f"pack: q has dtype {q.dtype}; use an integer dtype ({allowed})")
    qmin, qmax = int_range(bits, signed)
    if q.numel():
        lo, hi = (int(t) for t in torch.aminmax(q))
        if lo < qmin or hi > qmax:
            raise ValueError(
                f"pack: values must lie in [{qmin}, {qmax}] for bits={bits}, signed={signed}; got min {lo}, max {hi}"
            )
    # code = v - qmin, computed modulo 256 in uint8 (exact, as every code lies in [0, 255])
    return _pack_chunked(q.reshape(-1), bits, lambda c: c.to(torch.uint8) - qmin % 256)


def unpack(data: Tensor, bits: int, signed: bool, numel: int) -> Tensor:
    """Inverse of ``pack``: 1-D uint8 -> ``numel`` 1-D integers (int8, or int16 for unsigned 8 bits)."""
    nbytes = packed_nbytes(numel, bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise FormatError(
            f"packed data must be a 1-D torch.uint8 tensor; got dtype {data.dtype} with shape {tuple(data.shape)}"
        )
    if data.numel() != nbytes:
        raise FormatError(
            f"packed data for {numel} values at bits={bits}: expected {nbytes} bytes, got {data.numel()} bytes"
        )
    used = numel * bits % 8  # bits of the last byte that hold data
    if used and int(data[-1]) >> used:
        raise FormatError(
            f"packed data for {numel} values at bits={bits}: padding bits {used}..7 of the last byte "
            f"must be zero, got byte {int(data[-1]):#04x} (tampered or misread data)"
        )
    qmin, _ = int_range(bits, signed)
    out = torch.empty(numel, dtype=_unpacked_dtype(bits, signed), device=data.device)
    step = _chunk_values()
    for start in range(0, numel, step):
        n = min(step, numel - start)
        offset = start * bits // 8
        chunk = data[offset : offset + packed_nbytes(n, bits)]
        codes = _unpack_codes(chunk, bits, n)  # (n,) uint8
        # v = code + qmin: for signed grids, add modulo 256 and read the bytes as two's complement int8
        out[start : start + n] = (codes + qmin % 256).view(torch.int8) if signed else codes
    return out


def _sign_codes(chunk: Tensor) -> Tensor:
    bad = (chunk != 1) & (chunk != -1)
    if bool(bad.any()):
        examples = torch.unique(chunk[bad])[:5].tolist()
        raise ValueError(f"pack_sign: values must be -1 or +1; got {examples}")
    return (chunk > 0).to(torch.uint8)


def pack_sign(q: Tensor) -> Tensor:
    """Pack binary weights in {-1, +1} (integer or floating dtype) at 1 bit each: +1 -> 1, -1 -> 0."""
    if q.dtype not in _INT_DTYPES and not q.dtype.is_floating_point:
        raise ValueError(f"pack_sign: q has dtype {q.dtype}; use an integer or floating dtype")
    return _pack_chunked(q.reshape(-1), 1, _sign_codes)


def unpack_sign(data: Tensor, numel: int) -> Tensor:
    """Inverse of ``pack_sign``: 1-D uint8 -> ``numel`` int8 values in {-1, +1}."""
    return unpack(data, 1, False, numel) * 2 - 1
