"""Range (scale) initialisation: min-max, MSE grid search, Lp-norm grid search.

For each scale (one per tensor, channel or group) the data are viewed as one row of a matrix.

- ``minmax``: symmetric ``s = max|x| / qmax`` (``max(x) / qmax`` on the unsigned grid for non-negative
  data); asymmetric ``s = (max - min) / (qmax - qmin)``, ``z = qmin - round(min / s)``, with the range
  widened to include 0.
- ``mse`` / ``lp``: shrink the min-max range by ``c = k / n`` for ``k = 1..n`` (n = ``num_candidates``)
  and keep, per row, the ``c`` that minimises ``mean |q(x) - x|^p`` (p = 2 for ``mse``). LR-QAT uses
  ``lp`` with p = 4; the oscillations paper uses ``mse`` with 100 candidates.

Symmetric quantizers whose ``spec.signed`` is None choose the signed or unsigned grid from the data
(unsigned when ``min(x) >= 0``, e.g. after a ReLU), as in the official oscillations code; quantizers with
``symmetric: auto`` also choose between the symmetric and the asymmetric grid (``_choose_grid``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowbit.quant import functional as F
from lowbit.quant.quantizer import Quantizer
from lowbit.spec import AUTO_ASYMMETRIC_RATIO, QuantSpec

__all__ = ["init_range", "range_rows"]

MAX_CALIB_ELEMENTS = 1 << 18  # per-tensor grid search subsamples larger inputs (deterministically)


def range_rows(q: Quantizer, x: Tensor) -> Tensor:
    """``x`` as a matrix with one row per scale of ``q``."""
    x = x.detach().float()
    if q.granularity == "tensor":
        return x.reshape(1, -1)
    if q.granularity == "group":  # (rows * groups, group_size), a ragged last group zero-padded (see _valid)
        return q.view(x).reshape(-1, q.group_size)
    axis = q.axis
    if q.shape is None and x.dim() > 1 and axis == 0:
        axis = 1  # activations (N, C, ...)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def _valid(q: Quantizer, x: Tensor) -> Tensor | None:
    """1 where ``range_rows`` holds data and 0 at a ragged last group's padding (None: no padding). The
    padding's zeros leave min-max alone, but not every grid holds 0 (the stretched one does not), so errors
    are averaged over the data only."""
    if q.granularity != "group" or q.scale.shape[-1] * q.group_size == x[0].numel():
        return None
    return q.view(torch.ones_like(x, dtype=torch.float32)).reshape(-1, q.group_size)


def _subsample(rows: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if rows.numel() <= MAX_CALIB_ELEMENTS:
        return rows, valid
    per_row = max(MAX_CALIB_ELEMENTS // rows.shape[0], 1024)
    if per_row >= rows.shape[1]:
        return rows, valid
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(rows.shape[1], generator=gen)[:per_row]
    return rows[:, idx], (valid[:, idx] if valid is not None else None)


def _minmax_params(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool, stretched: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Scale and zero point per row for the range ``[lo, hi]`` (``lo <= 0 <= hi``); the stretched grid's
    outermost level is ``(qmax + ½)·s``."""
    tiny = torch.finfo(torch.float32).tiny
    if symmetric:
        denom = qmax + 0.5 if stretched else float(qmax) if qmax > 0 else float(-qmin)
        amax = torch.maximum(hi, -lo) if qmin < 0 else hi
        return (amax / denom).clamp_min(1e-8 if amax.max() > 0 else 1.0), None
    s = ((hi - lo) / float(qmax - qmin)).clamp_min(tiny)
    s = torch.where(hi - lo > 0, s, torch.ones_like(s))
    z = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
    return s, z


def _row_error(
    rows: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int, p: float, stretched: bool = False,
    valid: Tensor | None = None,
) -> Tensor:  # fmt: skip
    half = 0.5 * s[:, None] if stretched else 0.0  # the stretched grid: the ordinary one shifted by half a step
    q = F.fake_quantize(rows - half, s[:, None], z[:, None] if z is not None else None, qmin, qmax) + half
    err = (q - rows).abs().pow(p)
    return err.mean(dim=1) if valid is None else (err * valid).sum(dim=1) / valid.sum(dim=1)


def _search(
    rows: Tensor, qmin: int, qmax: int, symmetric: bool, spec: QuantSpec, valid: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per row: the scale and zero point of ``spec.init`` for the grid ``qmin..qmax``, and their error
    (``mean |q(x) − x|^p`` on the subsample; p = 2 for ``minmax`` and ``mse``)."""
    lo = rows.amin(dim=1).clamp_max(0.0)
    hi = rows.amax(dim=1).clamp_min(0.0)
    p = spec.p if spec.init == "lp" else 2.0
    sub, valid = _subsample(rows, valid)
    st = spec.stretched
    s, z = _minmax_params(lo, hi, qmin, qmax, symmetric, st)
    if spec.init == "minmax":
        return s, z, _row_error(sub, s, z, qmin, qmax, p, st, valid)
    best_err = torch.full_like(s, float("inf"))
    n = spec.num_candidates
    for k in range(1, n + 1):
        c = k / n
        cs, cz = _minmax_params(lo * c, hi * c, qmin, qmax, symmetric, st)
        err = _row_error(sub, cs, cz, qmin, qmax, p, st, valid)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        s = torch.where(better, cs, s)
        if z is not None and cz is not None:
            z = torch.where(better, cz, z)
    return s, z, best_err


def _choose_grid(q: Quantizer, rows: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """``symmetric: auto``: the unsigned grid for non-negative data; for signed data the symmetric signed
    grid unless the asymmetric one's error is below ``AUTO_ASYMMETRIC_RATIO`` times its error. Returns the
    chosen grid's searched scale and zero point (None for the unsigned grid, not searched here)."""
    if not bool(rows.min() < 0):
        q.use_grid(True, False)
        return None
    bits = q.nbits
    sym = _search(rows, *F.int_range(bits, True), True, q.spec)
    asym = _search(rows, *F.int_range(bits, False), False, q.spec)
    use_asym = bool(asym[2].sum() < AUTO_ASYMMETRIC_RATIO * sym[2].sum())
    q.use_grid(not use_asym, True)
    return asym[:2] if use_asym else sym[:2]


@torch.no_grad()
def init_range(q: Quantizer, x: Tensor) -> None:
    """Set ``q``'s scale (and zero point) from data ``x`` with the method of ``q.spec.init``."""
    spec = q.spec
    rows = range_rows(q, x)
    if spec.binary is not None:  # the grid {-s, +s}: s starts at mean |x| (a unit scale stays 1)
        q.signed.fill_(True)
        if spec.binary.scale != "one":
            q.scale.copy_(rows.abs().mean(dim=1).reshape(q.scale.shape))
        q.initialized.fill_(True)
        return
    chosen = _choose_grid(q, rows) if spec.symmetric == "auto" else None
    if spec.symmetric != "auto" and spec.signed is None and spec.symmetric and not spec.stretched:
        q.signed.fill_(bool(rows.min() < 0))  # stretched: always the signed k
    if chosen is not None:
        s, z = chosen
    else:
        qmin, qmax = q.int_grid()
        s, z, _ = _search(rows, qmin, qmax, q.symmetric, spec, _valid(q, x))
    q.scale.copy_(s.reshape(q.scale.shape))
    if q.zero_point is not None and z is not None:
        q.zero_point.copy_(z.reshape(q.zero_point.shape))
    q.initialized.fill_(True)
