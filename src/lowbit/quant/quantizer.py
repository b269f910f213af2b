"""The ``Quantizer`` module: the state of one uniform quantizer, and nothing else.

State (all created at construction, so ``state_dict``, ``.to()``, DDP and resume just work):

- ``bits`` (0-d int buffer) and ``signed`` (0-d bool buffer): the integer grid. Changing ``bits`` at
  run time (``set_bits``) never re-swaps modules; the grid is derived from these two on each call.
- ``scale``: a parameter when learned (LSQ), else a buffer; shape ``()`` per tensor, ``(C,)`` per
  channel along ``axis``, ``(rows, ⌈cols / group_size⌉)`` per group of a 2-D view of the tensor. A last
  group that the row does not fill (SmolLM2's 576 inputs in groups of 128) is ragged: ``view`` pads it
  with zeros, which every grid holds exactly and which ``unview`` drops again, so they carry no gradient.
- ``zero_point``: asymmetric quantizers only; a parameter when learned (LSQ+), rounded in use.
- the stretched grid (``spec.stretched``, weights only): levels ``(k + ½)·s`` on the signed grid of ``k``,
  computed on the integer path as ``k = clip(round_STE((x − s/2)/s))``, ``(k + ½)·s`` (one rounding, as the
  exported ``(2k + 1)·(s/2)``); autograd gives the LSQ gradient of the stretched grid (``round(u) − u``
  with ``u = x/s − ½`` inside, ``k + ½`` where clipped).
- ``initialized``: whether the range was set from data.

Under ``torch.compile`` the grid is never read from the buffers (that would be a data-dependent Python
value, a graph break): ``int_grid`` returns the Python ``(qmin, qmax)`` it keeps, which construction,
``set_bits``, ``use_grid`` and ``load_state_dict`` refresh eagerly, and which the compiled graph guards on
(a new bit width recompiles). Change the grid through those, not by writing the buffers in place.

The integer slot: ``int_transform`` is an optional submodule ``f(x_int, quantizer) -> x_int`` that
methods install (weight freezing, bit reallocation, ...). When it is set, ``forward`` goes through the
integer path ``dequantize(f(quantize_ste(x)))``; when it is not, through the single-node fast path
``fake_quantize``. ``to_int`` always uses the integer path; both paths give identical values (tested),
so what is trained is what is exported. A transform that is the identity for now (a tracker with
nothing frozen yet) says so through an optional ``passthrough() -> bool``, keeping the fast path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError
from lowbit.quant import functional as F

_SCALE_DTYPES = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}  # spec.scale_dtype

if TYPE_CHECKING:
    from lowbit.config import QuantSpec

__all__ = ["Quantizer"]


class Quantizer(nn.Module):
    """Uniform (a)symmetric quantizer for one tensor of a known shape (or per tensor for activations).

    ``shape`` is the shape of the tensor it quantizes, needed for per-channel and per-group scales;
    activation quantizers pass ``None`` and must be per tensor, or per channel with ``channels``.
    """

    int_transform: nn.Module | None

    def __init__(
        self,
        spec: QuantSpec,
        shape: tuple[int, ...] | None = None,
        *,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.granularity = spec.granularity
        self.axis = spec.axis
        self.group_size = spec.group_size
        self.symmetric = spec.symmetric is not False  # symmetric: auto starts symmetric (see use_grid)
        self.shape = tuple(shape) if shape is not None else None
        self.stretched = spec.stretched
        if spec.stretched and shape is None:
            raise ConfigError("the stretched grid (stretched: true) has no level at 0, which suits weights only: "
                              "set stretched: false for activations")  # fmt: skip
        scale_shape = self._scale_shape(shape, channels)
        signed = spec.signed if spec.signed is not None else self.symmetric
        self.register_buffer("bits", torch.tensor(spec.bits, dtype=torch.int64))
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self.register_buffer("initialized", torch.tensor(False))
        scale = torch.ones(scale_shape)
        if spec.binary is not None and spec.binary.scale == "mean_abs" and shape is None:
            raise ConfigError("binary scale mean_abs is recomputed from the tensor on every call, which suits "
                              "weights only: give activations binary: {scale: learned} or {scale: one}")  # fmt: skip
        if spec.learn_scale if spec.binary is None else spec.binary.scale == "learned":
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.zero_point = None
        if not self.symmetric:
            self._add_zero_point()
        self.int_transform = None
        self.observed: list[Tensor] | None = None  # set only while calibrating (see lowbit.api)
        self._keep_grid(spec.bits, bool(signed))  # the values just stored (no read back from the buffers)

    def _add_zero_point(self) -> None:
        self.__dict__.pop("zero_point", None)  # the plain None attribute of a symmetric grid
        z = torch.zeros(self.scale.shape, device=self.scale.device)
        if self.spec.learn_zero_point and self.spec.learn_scale:
            self.zero_point = nn.Parameter(z)
        else:
            self.register_buffer("zero_point", z)

    @torch.no_grad()
    def use_grid(self, symmetric: bool, signed: bool) -> None:
        """Switch a ``symmetric: auto`` quantizer's grid (calibration does, before any optimizer exists):
        asymmetric grids gain a zero point (a parameter when learned) and are unsigned."""
        if self.spec.symmetric != "auto":
            raise ValueError(f"only symmetric: auto chooses its grid (this quantizer: {self.spec.symmetric})")
        if symmetric and self.zero_point is not None:
            del self.zero_point
            self.zero_point = None
        elif not symmetric and self.zero_point is None:
            self._add_zero_point()
        self.symmetric = symmetric
        self.signed.fill_(bool(signed) and symmetric)
        self._keep_grid(int(self.bits), bool(signed) and symmetric)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object, **kwargs: object) -> None:
        if self.spec.symmetric == "auto":  # the grid the saved quantizer chose (a zero point: asymmetric)
            has_zero = prefix + "zero_point" in state_dict
            if has_zero != (self.zero_point is not None):
                self.use_grid(not has_zero, bool(self.signed))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]
        self._keep_grid(int(self.bits), bool(self.signed))  # the loaded grid, before any compiled call asks

    # -- shapes ---------------------------------------------------------------------------------
    def _scale_shape(self, shape: tuple[int, ...] | None, channels: int | None) -> tuple[int, ...]:
        g = self.granularity
        if g == "tensor":
            return ()
        if g == "channel":
            if shape is not None:
                axis = self.axis if self.axis >= 0 else len(shape) + self.axis
                if not 0 <= axis < len(shape):
                    raise ValueError(f"axis={self.axis} is out of range for a tensor of shape {shape}")
                return (shape[axis],)
            if channels is None:
                raise ValueError("a per-channel activation quantizer needs `channels`")
            return (channels,)
        # group: a 2-D view (rows, cols) with groups of `group_size` consecutive columns
        if shape is None:
            raise ValueError("granularity='group' applies to weights only (activations need a shape)")
        rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
        gs = self.group_size
        assert gs is not None
        return (rows, -(-cols // gs))  # the last group may be ragged (see the module docstring)

    def view(self, x: Tensor) -> Tensor:
        """``x`` reshaped so that the scale broadcasts against it; per group ``(rows, groups, group_size)``,
        a ragged last group padded with zeros."""
        if self.granularity == "group":
            return F.pad_groups(x, self.scale.shape[-1], self.group_size)
        return x

    def unview(self, v: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """The inverse of ``view``: ``v`` back in ``shape``, a ragged last group's padding dropped."""
        if self.granularity != "group":  # per tensor or channel: never reshaped (no view node in the graph)
            return v
        if v.numel() != torch.Size(shape).numel():
            v = v.reshape(shape[0], -1)[:, : torch.Size(shape[1:]).numel()]
        return v.reshape(shape)

    def _broadcast(self, p: Tensor, x: Tensor) -> Tensor:
        """Reshape a scale-shaped tensor so it broadcasts against ``self.view(x)``."""
        if self.granularity == "tensor":
            return p
        if self.granularity == "group":
            return p.unsqueeze(-1)  # (rows, groups, 1)
        axis = self.axis if self.axis >= 0 else x.dim() + self.axis
        if self.shape is None and x.dim() > 1 and self.axis == 0:
            axis = 1  # activations: channels live on dim 1 (N, C, ...)
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)

    def zero_point_view(self, x: Tensor) -> Tensor:
        """The zero point rounded to the grid (straight through), broadcastable against ``self.view(x)``."""
        assert self.zero_point is not None
        qmin, qmax = self.int_grid()
        return self._broadcast(F.zero_point_int(self.zero_point, qmin, qmax), x)

    # -- the grid -------------------------------------------------------------------------------
    def int_grid(self) -> tuple[int, int]:
        """``(qmin, qmax)`` from the ``bits`` and ``signed`` buffers.

        Reading a GPU buffer into Python waits for the device, and a training step asks hundreds of
        times, so the answer is kept until either buffer is replaced (``.to``, ``load_state_dict``) or
        written in place (``set_bits``, ``fill_``, ``copy_``: each bumps the tensor's version counter).
        Under ``torch.compile`` the kept answer is returned as it is (see the module docstring).
        """
        if self.spec.binary is not None:
            return -1, 1  # the integers of the binary grid are -1 and +1 (0 is not one of them)
        if torch.compiler.is_compiling():  # no tensor reads: the kept grid, a constant the graph guards on
            return self.__dict__["_grid"]
        bits, signed = self._buffers["bits"], self._buffers["signed"]  # not nn.Module.__getattr__: per call
        key = (id(bits), bits._version, id(signed), signed._version)
        if self.__dict__.get("_grid_key") != key:
            self._keep_grid(int(self.bits), bool(self.signed))
        return self.__dict__["_grid"]

    def _keep_grid(self, bits: int, signed: bool) -> None:
        """Keep the grid of ``bits`` and ``signed`` (the buffers' current values) for ``int_grid``.

        The grid and the buffers' key live in ``__dict__`` apart, so a compiled graph guards on the two
        integers only, not on identities and versions (which ``.to()`` changes without changing the grid)."""
        self.__dict__["_grid_key"] = (id(self.bits), self.bits._version, id(self.signed), self.signed._version)
        self.__dict__["_grid"] = F.int_range(bits, signed)

    @property
    def nbits(self) -> int:
        """``bits`` as a Python int (see ``int_grid`` on why this does not read the buffer each time)."""
        qmin, qmax = self.int_grid()
        return (qmax - qmin + 1).bit_length() - 1

    @torch.no_grad()
    def set_bits(self, bits: int, keep_range: bool = True) -> None:
        """Change the bit width in place (no new modules, no new parameters).

        ``keep_range`` (default) rescales the step so the grid spans the same real interval:
        ``s' = s·(qmax − qmin)/(qmax' − qmin')`` (METHODS.md §4.5), and an asymmetric zero point moves so
        that the interval's ends stay where they were. ``keep_range=False`` keeps the step instead.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits={bits!r} is not allowed: use an integer in 1..8")
        if self.spec.binary is not None:
            raise ValueError("a binary quantizer has the grid {-s, +s}: its bit width cannot change")
        qmin, qmax = self.int_grid()
        nmin, nmax = F.int_range(bits, bool(self.signed))
        if keep_range and (nmin, nmax) != (qmin, qmax):
            ratio = (qmax - qmin + self.stretched) / (nmax - nmin + self.stretched)  # stretched: 2^b steps wide
            if self.zero_point is not None:
                self.zero_point.copy_(nmin + (self.zero_point - qmin) / ratio)
            self.scale.mul_(ratio)
        self.bits.fill_(bits)
        self._keep_grid(bits, bool(self.signed))

    def scale_value(self) -> Tensor:
        """The scale as every path uses it: the stored one rounded to ``spec.scale_dtype`` (float16 for GGUF's
        block types), with a straight-through gradient to the float32 parameter; sign and shape kept."""
        s, dtype = self.scale, _SCALE_DTYPES[self.spec.scale_dtype]
        if dtype is None or s.dtype == dtype:
            return s
        return s + (s.detach().to(dtype).to(s.dtype) - s.detach())

    def qparams(self, x: Tensor, qmax: int) -> tuple[Tensor, Tensor | None]:
        """The raw scale (used by magnitude) and the zero point, broadcastable against ``self.view(x)``."""
        s = self.scale_value()
        if self.spec.grad_scale and self.training and isinstance(self.scale, nn.Parameter):
            n = x.numel() // max(self.scale.numel(), 1)
            s = F.grad_scale(s, F.lsq_grad_factor(n, float(qmax)))
        z = self.zero_point
        return self._broadcast(s, x), (self._broadcast(z, x) if z is not None else None)

    # -- the two paths --------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.observed is not None:  # calibration: record the float input, pass it through
            self.observed.append(x.detach())
            return x
        if self.spec.binary is not None:
            return (self.quantize_ste(x) * self.binary_scale(x)).reshape(x.shape)
        qmin, qmax = self.int_grid()
        s, z = self.qparams(x, qmax)
        xv = self.view(x)
        t = self.int_transform
        offset16 = z is not None and self.spec.offset == "float16"
        fast = not offset16 and not self.stretched  # stretched: (k + ½)·s in one rounding, as its export computes
        if fast and (t is None or (callable(getattr(t, "passthrough", None)) and t.passthrough())):
            return self.unview(F.fake_quantize(xv, s, z, qmin, qmax), x.shape)
        sp = F.positive_scale(s, F.SCALE_EPS)
        x_int = F.quantize_ste(self._shift(xv, sp), s, z, qmin, qmax)
        if t is not None:
            x_int = t(x_int, self)
        if self.stretched:
            return self.unview((x_int + 0.5) * sp, x.shape)
        zi = F.zero_point_int(z, qmin, qmax)
        if offset16:  # s·q + float16(−s·z), as integer modules and GGUF's Q4_1 compute it
            return self.unview(x_int * sp + F.offset_float16(sp, zi), x.shape)
        y = (x_int - zi) * sp if zi is not None else x_int * sp
        return self.unview(y, x.shape)

    def _shift(self, xv: Tensor, sp: Tensor) -> Tensor:
        """The stretched grid is the ordinary one shifted by half a step: ``x − s/2`` (others: ``x``)."""
        return xv - 0.5 * sp if self.stretched else xv

    def quantize_ste(self, x: Tensor, transform: bool = True) -> Tensor:
        """Integers of ``x`` (float dtype, straight-through gradients), after ``int_transform`` unless
        ``transform=False`` (the raw rounded integers, which methods that track them need)."""
        if self.spec.binary is not None:
            x_int = F.sign_ste(x, self.spec.binary.grad)
            if self.spec.binary.scale == "mean_abs":
                self.binary_scale(x)  # keep the stored scale that of the integers just produced
        else:
            qmin, qmax = self.int_grid()
            s, z = self.qparams(x, qmax)
            x_int = F.quantize_ste(self._shift(self.view(x), F.positive_scale(s, F.SCALE_EPS)), s, z, qmin, qmax)
        if transform and self.int_transform is not None:
            x_int = self.int_transform(x_int, self)
        return self.unview(x_int, x.shape)

    def binary_scale(self, x: Tensor) -> Tensor:
        """The binary grid's ``s``, broadcastable against ``x``: the learned or unit scale, or ``mean |x|`` per
        scale element (detached, and stored in the ``scale`` buffer so that export writes the same value)."""
        binary = self.spec.binary
        assert binary is not None
        if binary.scale == "mean_abs":
            x = x.detach()
            dims = [d for d in range(x.dim()) if self.granularity == "tensor" or d != self.axis % x.dim()]
            m = x.abs().mean(dim=dims)
            with torch.no_grad():
                self.scale.copy_(m.reshape(self.scale.shape))
            return self._broadcast(m.reshape(self.scale.shape), x)
        return self._broadcast(F.positive_scale(self.scale_value(), F.SCALE_EPS), x)

    @torch.no_grad()
    def to_int(self, x: Tensor) -> Tensor:
        """Integers of ``x`` (``int32``), exactly the ones ``forward`` dequantizes."""
        return self.quantize_ste(x).round().to(torch.int32)

    @torch.no_grad()
    def export_qparams(self) -> tuple[Tensor, Tensor | None]:
        """Positive scale and integer zero point in their stored shapes (for integer modules)."""
        s = F.positive_scale(self.scale_value(), F.SCALE_EPS).detach().clone()
        if self.zero_point is None:
            return s, None
        qmin, qmax = self.int_grid()
        return s, self.zero_point.detach().clamp(qmin, qmax).round().clone()

    def extra_repr(self) -> str:
        gran = self.granularity + (f"({self.group_size})" if self.granularity == "group" else "")
        kind = "stretched" if self.stretched else "sym" if self.symmetric else "asym"
        return f"bits={int(self.bits)}, {kind}, signed={bool(self.signed)}, {gran}"
