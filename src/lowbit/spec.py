"""How one tensor is quantized: ``QuantSpec`` (bit width, grid, granularity, scales, range init), the
binary grid ``BinarySpec``, and the GGUF presets (``format``). Re-exported by ``lowbit.config``.

``scale_dtype``: the dtype the scales are rounded to wherever they are used (training included, with a
straight-through gradient to the float32 parameter that trains), and in which they are exported:
``float16`` is what llama.cpp's block formats store, so a scale trained this way is the file's scale
exactly; it also halves the scales of fine-grained grids (a depthwise convolution's 9 weights per scale).

``format``: a GGUF block type whose grid the weights train on, filling the fields it fixes (a field set
to another value than the format's is an error naming both):

- ``q4_0``: signed 4-bit integers −8..7, groups of 32 along the input, one float16 scale per group;
- ``q8_0``: the same at 8 bits (−128..127; llama.cpp's own quantizer uses −127..127);
- ``q4_1``: unsigned 4-bit integers 0..15 with a zero point, groups of 32, float16 scales, and
  ``offset: float16``: a value is ``s·q + m`` with ``m = float16(−s·z)``, the float16 minimum Q4_1 stores
  per block (rounded in training too, with a straight-through gradient), so the file is the trained grid.

``symmetric: auto`` (the default of ``QuantConfig.act``): the grid is chosen per quantizer from its
calibration data (activations, where the data differ from layer to layer): non-negative data take the
unsigned grid; signed data take the symmetric signed grid unless the asymmetric grid's calibration error
(the same range search) is below ``AUTO_ASYMMETRIC_RATIO`` times its error, which happens when the data are
skewed to one side (a residual stream, GELU outputs). Symmetric where it is enough keeps integer kernels
free of zero-point terms. A spec whose other fields fix the grid (``signed``, ``binary``, ``format``,
``stretched``) resolves ``auto`` to ``true``.

``stretched``: the zero-free symmetric grid of ParetoQ (Liu et al. 2025, "SEQ"): levels ``(k + ½)·s`` for
``k = −2^(b−1) .. 2^(b−1)−1`` (2 bits: ``{±½, ±3⁄2}·s``), every level in use and none at 0. Weights only.
Its values are not integers times ``s``, but ``(2k + 1)·(s/2)`` are: converted models hold the odd
integers ``2k + 1`` at half the scale on a ``b+1``-bit signed grid, so every export (lowbit's file, ONNX,
GGUF's Q4_0 for 2 and 3 bits in groups of 32 with float16 scales) is exact, at one more stored bit per
weight in lowbit's own file. (GGUF: where ``s/2`` falls below float16's normal range, ``s < 1.2e−4``, it
is not a float16 number, and the export refuses the layer unless told to round its scales.)

``offset``: how an asymmetric grid's zero point enters: ``integer`` (``s·(q − z)``, what ONNX and lowbit's
other exports hold) or ``float16`` (``s·q + m`` as above; GGUF's Q4_1 only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lowbit.validate import check as _check
from lowbit.validate import check_int, check_number

__all__ = ["BinarySpec", "QuantSpec", "GGUF_FORMATS", "SCALE_DTYPES", "GRANULARITIES", "MAX_LENGTH",
           "AUTO_ASYMMETRIC_RATIO"]

GRANULARITIES = ("tensor", "channel", "group")
BINARY_SCALES = ("mean_abs", "learned", "one")
BINARY_GRADS = ("clip", "approxsign")
INITS = ("minmax", "mse", "lp")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
MAX_CANDIDATES = 10_000
MAX_LENGTH = 1 << 20  # of a sequence, an evaluation window or a quantization group
# what each GGUF block type fixes (the other fields stay the user's: init, learn_scale, ...)
GGUF_FORMATS: dict[str, dict[str, Any]] = {
    "q4_0": {"bits": 4, "symmetric": True, "signed": True, "granularity": "group", "group_size": 32,
             "scale_dtype": "float16", "axis": 0, "binary": None},
    "q8_0": {"bits": 8, "symmetric": True, "signed": True, "granularity": "group", "group_size": 32,
             "scale_dtype": "float16", "axis": 0, "binary": None},
    "q4_1": {"bits": 4, "symmetric": False, "signed": False, "granularity": "group", "group_size": 32,
             "scale_dtype": "float16", "axis": 0, "binary": None, "offset": "float16"},
}  # fmt: skip
OFFSETS = ("integer", "float16")
SYMMETRIC = (True, False, "auto")
AUTO_ASYMMETRIC_RATIO = 0.75  # symmetric: auto takes the asymmetric grid when its error is below 3/4 of the symmetric's


@dataclass(frozen=True)
class BinarySpec:
    """The binary grid {−s, +s}: ``y = s·sign(x)`` (sign(0) = +1), integers −1 and +1 (not the 1-bit signed
    grid {−1, 0}). ``scale``: ``mean_abs`` (s = mean |x| per scale element, recomputed on every call, not
    learned: XNOR/ReActNet), ``learned`` (a trained parameter, started at mean |x|), ``one`` (s = 1: batch
    norm absorbs it; the parameter may hold ±1 itself, as under CEMA and Bop). ``grad``: the straight-through
    gradient of sign, ``clip`` (1 where |x| ≤ 1) or ``approxsign`` (Bi-Real: 2 − 2|x| where |x| ≤ 1)."""

    scale: str = "mean_abs"
    grad: str = "clip"

    def __post_init__(self) -> None:
        _check(self.scale in BINARY_SCALES, "scale", self.scale, f"one of {BINARY_SCALES}")
        _check(self.grad in BINARY_GRADS, "grad", self.grad, f"one of {BINARY_GRADS}")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one tensor: bit width, grid, granularity, scale learning and range init."""

    bits: int = 8
    symmetric: bool | str = True  # or "auto": chosen per quantizer at calibration (module docstring)
    granularity: str = "tensor"
    group_size: int | None = None
    learn_scale: bool = True
    learn_zero_point: bool = True
    signed: bool | None = None  # None: from the data at calibration (unsigned after a ReLU)
    axis: int = 0
    init: str = "mse"
    p: float = 4.0
    num_candidates: int = 100
    grad_scale: bool = False  # LSQ gradient scaling 1/sqrt(N * qmax); off as in the official code
    binary: BinarySpec | None = None  # the binary grid {−s, +s} instead of the integer grid (bits: 1)
    scale_dtype: str = "float32"  # the scales as used and exported (see the module docstring)
    format: str | None = None  # a GGUF block type's grid (q4_0, q8_0, q4_1): fills the fields it fixes
    offset: str = "integer"  # asymmetric grids: s·(q − z), or "float16": s·q + m, m = float16(−s·z) (Q4_1)
    stretched: bool = False  # the zero-free grid (k + 1/2)·s (ParetoQ), weights only (module docstring)

    def __post_init__(self) -> None:
        if self.symmetric == "auto" and (self.binary or self.format or self.stretched or self.signed is not None):
            object.__setattr__(self, "symmetric", True)  # another field fixes the grid: nothing left to choose
        if self.format is not None:
            _check(self.format in GGUF_FORMATS, "format", self.format, f"null or one of {tuple(GGUF_FORMATS)}")
            defaults = {f.name: f.default for f in dataclasses.fields(QuantSpec)}
            for key, value in GGUF_FORMATS[self.format].items():
                mine = getattr(self, key)
                allowed = f"{value!r}, which format {self.format!r} fixes (leave {key} out, or drop the format)"
                _check(mine in (value, defaults[key]), key, mine, allowed)
                object.__setattr__(self, key, value)
        _check(self.scale_dtype in SCALE_DTYPES, "scale_dtype", self.scale_dtype, f"one of {SCALE_DTYPES}")
        _check(self.offset in OFFSETS, "offset", self.offset, f"one of {OFFSETS}")
        _check(any(self.symmetric is v for v in SYMMETRIC[:2]) or self.symmetric == "auto", "symmetric",
               self.symmetric, "true, false or auto (chosen per quantizer from the calibration data)")
        _check(self.offset == "integer" or self.symmetric is False, "offset", self.offset,
               "'integer' for a symmetric grid (a float16 offset needs symmetric: false)")  # fmt: skip
        check_int("bits", self.bits, 1, 8)
        _check(isinstance(self.stretched, bool), "stretched", self.stretched, "true or false")
        if self.stretched:
            why = ("false unless bits 2..7 (it exports at one more), symmetric: true, signed: null or true, no binary "
                   "grid, no format")
            ok = 2 <= self.bits <= 7 and self.symmetric is True and self.signed is not False
            _check(ok and self.binary is None and self.format is None, "stretched", self.stretched, why)
        if self.binary is not None:
            why = "the binary grid {-s, +s} (binary: ...) needs bits: 1, symmetric: true, signed: null or true"
            ok = self.bits == 1 and self.symmetric is True and self.signed is not False
            _check(ok, "binary", self.binary, why)
            _check(self.granularity != "group", "granularity", self.granularity,
                   "tensor or channel with the binary grid")  # fmt: skip
        _check(self.granularity in GRANULARITIES, "granularity", self.granularity, f"one of {GRANULARITIES}")
        if self.granularity == "group":
            allowed = f"an integer from 1 to {MAX_LENGTH:_} when granularity='group'"
            check_int("group_size", self.group_size, 1, MAX_LENGTH, allowed)
        else:
            _check(
                self.group_size is None,
                "group_size",
                self.group_size,
                "None unless granularity='group' (set granularity: group to quantize in groups)",
            )
        _check(self.init in INITS, "init", self.init, f"one of {INITS}")
        object.__setattr__(self, "p", check_number("p", self.p, 0, 100, "a number in (0, 100]", open_lo=True))
        check_int("num_candidates", self.num_candidates, 1, MAX_CANDIDATES)
        check_int("axis", self.axis, -8, 7, "an integer dimension index from -8 to 7")
        for name in ("learn_scale", "learn_zero_point", "grad_scale"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        _check(self.signed is None or isinstance(self.signed, bool), "signed", self.signed, "true, false or null")

    def replace(self, **changes: Any) -> QuantSpec:
        return dataclasses.replace(self, **changes)


