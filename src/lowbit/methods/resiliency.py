"""Resiliency of deep networks under quantization (Sung, Shin, Hwang 2015; METHODS.md §3).

The M-level symmetric quantizer (M odd; M = 3 is ternary, M = 7 is "3 bits"), with ``L = (M - 1) / 2``::

    z_i  = clip(round(w_i / Δ), -L, L)          Q(w_i) = Δ · z_i

The step Δ is chosen per layer (per scale of the weight quantizer: per tensor in the paper) to minimise
the L2 error ``E(Δ) = Σ_i (Δ·z_i(Δ) - w_i)²``. The paper's procedure alternates two steps until the
assignment stops changing:

    1. given Δ, assign each weight its level z_i;      2. given the levels, Δ = Σ w_i z_i / Σ z_i².

Each step lowers E, so the alternation always stops, but at a local minimum: E(Δ) is piecewise
quadratic with one piece per assignment, and on small tensors it has many shallow local minima (from a
grid-search start the alternation misses the global one on about one random 100-element tensor in
ten). ``l2_optimal_step`` therefore finds the global minimum exactly: as Δ falls from ∞ to 0 the
assignment changes only where ``|w_i| / Δ = k + 1/2`` (k = 0 .. L-1), so there are ``n·L + 1``
assignments; for each, the step update (2) clamped to its piece gives that piece's minimum, and the
best of them is the optimum. (E is a sum of minima of convex quadratics, so its kinks point up and the
optimum lies inside a piece: it is a fixed point of the alternation, which then runs once to confirm
it with the quantizer's own rounding.) When ``n·L`` exceeds ``exact_limit`` (8-bit layers), the start is
the best of a grid of steps and the alternation runs from there.

Retraining (``Resiliency``, a method): after ``prepare`` it replaces each weight quantizer's scale by
the L2-optimal step, freezes it (``requires_grad=False``: the step is not learned), and installs a
``LevelClamp`` in the quantizer's integer slot, so that the signed b-bit grid ``[-2^(b-1), 2^(b-1)-1]``
becomes the symmetric ``[-L, L]``. Latent float weights then train through the straight-through
estimator (gradient 1 inside ``[-L, L]``, 0 where clipped) in the ordinary QAT loop, and ``convert`` /
export write the same integers: ternary weights are 2-bit codes in {-1, 0, 1}; M = 7 uses 3 bits.
By default ``M = 2^b - 1`` for each layer's bit width ``b``; ``levels`` sets M (odd, fitting in ``b``).
The effective compression ratio that compares such networks with float ones is in ``lowbit.sweep.ecr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError
from lowbit.quant import functional as F
from lowbit.quant.calibrate import range_rows
from lowbit.quant.modules import quantized_layers
from lowbit.quant.quantizer import Quantizer

__all__ = [
    "LevelClamp",
    "Resiliency",
    "alternate_step",
    "l2_error",
    "l2_optimal_step",
    "level_quantize",
]

EXACT_LIMIT = 1 << 22  # breakpoints (n·L per row, summed over rows) searched exactly; beyond: grid + alternation


def _assign(rows: Tensor, step: Tensor, max_level: int) -> Tensor:
    """Levels ``clip(round(x/Δ), -L, L)``, computed as the quantizer computes them (``x · (1/Δ)``)."""
    return torch.round(rows * torch.reciprocal(step[:, None])).clamp(-max_level, max_level)


def level_quantize(x: Tensor, step: Tensor | float, max_level: int) -> Tensor:
    """``Δ · clip(round(x/Δ), -L, L)``: the M-level quantizer, M = 2L + 1 (``step`` broadcasts against x)."""
    return F.dequantize(F.quantize(x, step, None, -max_level, max_level), step)


def l2_error(rows: Tensor, step: Tensor, max_level: int) -> Tensor:
    """Per row of ``rows`` (R, n): ``Σ (Δ·z - x)²`` at the steps ``step`` (R,)."""
    z = _assign(rows, step, max_level)
    return ((z * step[:, None] - rows).double() ** 2).sum(dim=1)


@torch.no_grad()
def alternate_step(rows: Tensor, step: Tensor, max_level: int, max_iter: int = 100) -> tuple[Tensor, int]:
    """The paper's alternation from ``step`` (R,): assign levels, refit Δ = Σxz/Σz², until nothing changes.

    Returns the steps and the number of refits that changed them (0: ``step`` was already a fixed point).
    Each refit is the least-squares Δ for the current levels, so the error never rises; rows whose
    levels are all 0 keep their step.
    """
    rows, step = rows.float(), step.float().clone()
    z = _assign(rows, step, max_level)
    for it in range(max_iter):
        szz = (z.double() ** 2).sum(dim=1)
        swz = (rows.double() * z.double()).sum(dim=1)
        new = torch.where(szz > 0, swz / szz.clamp_min(1.0), step.double()).float()
        if torch.equal(new, step):
            return step, it
        step = new
        z_new = _assign(rows, step, max_level)
        if torch.equal(z_new, z):  # the same levels refit to the same step: converged
            return step, it + 1
        z = z_new
    return step, max_iter


def _grid_start(rows: Tensor, max_level: int, num_candidates: int = 100) -> Tensor:
    """The best of ``Δ = (k/N) · 2·max|x| / (2L - 1)``, k = 1..N (the range where the top level is used)."""
    amax = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    best_s, best_e = amax.clone(), torch.full_like(amax, float("inf"), dtype=torch.float64)
    for k in range(1, num_candidates + 1):
        s = amax * (k / num_candidates) * 2.0 / (2 * max_level - 1)
        e = l2_error(rows, s, max_level)
        better = e < best_e
        best_e, best_s = torch.where(better, e, best_e), torch.where(better, s, best_s)
    return best_s


def _exact_step(rows: Tensor, max_level: int) -> Tensor:
    """The global minimiser of E(Δ) per row, over all ``n·L + 1`` assignments (float64)."""
    a = rows.abs().double()  # (R, n)
    r, n = a.shape
    k = torch.arange(max_level, dtype=torch.float64)  # crossing |x|/Δ = k + 1/2 raises z from k to k + 1
    points = (a[:, :, None] / (k + 0.5)).reshape(r, n * max_level)  # (R, n·L) breakpoints in Δ
    points, order = torch.sort(points, dim=1, descending=True)
    swz = torch.cumsum(a.gather(1, order // max_level), dim=1)  # Σ|x|z grows by |x| at each crossing
    szz = torch.cumsum((2 * (order % max_level) + 1).double(), dim=1)  # Σz² grows by (k+1)² - k²
    del order
    upper = points  # piece j spans [points[j + 1], points[j]]
    lower = torch.cat([points[:, 1:], torch.zeros(r, 1, dtype=torch.float64)], dim=1)
    cand = torch.minimum(torch.maximum(swz / szz, lower), upper)
    err = (a**2).sum(dim=1, keepdim=True) - 2 * cand * swz + cand**2 * szz
    best = cand.gather(1, err.argmin(dim=1, keepdim=True)).squeeze(1)
    return torch.where(best > 0, best, torch.ones_like(best)).float()  # an all-zero row: any step (1)


@torch.no_grad()
def l2_optimal_step(rows: Tensor, max_level: int, exact_limit: int = EXACT_LIMIT, max_iter: int = 100) -> Tensor:
    """Per row of ``rows`` (R, n): the step Δ > 0 minimising ``Σ (Δ·clip(round(x/Δ), -L, L) - x)²``.

    Exact (see the module docstring) when ``R·n·L <= exact_limit``, else the best of a 100-step grid
    refined by the alternation; in both cases the alternation runs last, with the quantizer's rounding.
    """
    if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1:
        raise ValueError(f"max_level={max_level!r} is not allowed: use an integer >= 1 (M = 2L + 1 levels)")
    if rows.dim() != 2 or rows.numel() == 0:
        raise ValueError(f"rows of shape {tuple(rows.shape)}: expected a non-empty (R, n) matrix")
    rows = rows.detach().float()
    start = _exact_step(rows, max_level) if rows.numel() * max_level <= exact_limit else _grid_start(rows, max_level)
    step, _ = alternate_step(rows, start, max_level, max_iter)
    # the alternation cannot raise the error; keep the start where float rounding says otherwise
    keep = l2_error(rows, start, max_level) < l2_error(rows, step, max_level)
    return torch.where(keep, start, step)


class LevelClamp(nn.Module):
    """An ``int_transform``: clips a signed grid's integers to ``[-L, L]`` (M = 2L + 1 levels)."""

    max_level: Tensor

    def __init__(self, max_level: int) -> None:
        super().__init__()
        self.register_buffer("max_level", torch.tensor(max_level, dtype=torch.int64))

    def forward(self, x_int: Tensor, quantizer: Quantizer) -> Tensor:
        lv = int(self.max_level)
        return x_int.clamp(-lv, lv)  # clamp: gradient 1 inside [-L, L] (inclusive), 0 outside

    def extra_repr(self) -> str:
        return f"levels={2 * int(self.max_level) + 1}"


@dataclass(frozen=True)
class ResiliencySettings:
    """``resiliency``: ``levels`` M for every quantized weight (odd, >= 3, at most ``2^b - 1`` for a layer of
    ``b`` bits; ``None``: ``2^b - 1`` per layer, ternary at 2 bits, 7 levels at 3 bits); ``exact_limit``:
    breakpoints searched exactly before falling back to grid search and alternation."""

    levels: int | None = None
    exact_limit: int = EXACT_LIMIT

    def __post_init__(self) -> None:
        lv, el = self.levels, self.exact_limit
        if lv is not None and (isinstance(lv, bool) or not isinstance(lv, int) or lv < 3 or lv % 2 == 0):
            raise ConfigError(f"levels={lv!r} is not allowed: use null (2^bits - 1) or an odd integer >= 3")
        if isinstance(el, bool) or not isinstance(el, int) or el < 0:
            raise ConfigError(f"exact_limit={el!r} is not allowed: use an integer >= 0")


class Resiliency:
    """Sung et al. 2015: L2-optimal fixed steps on M-level symmetric weight grids, then retraining."""

    Settings = ResiliencySettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        self.settings = s = ResiliencySettings(**settings)
        self.levels, self.exact_limit = s.levels, s.exact_limit

    def _max_level(self, name: str, bits: int) -> int:
        top = 2 ** (bits - 1) - 1  # the largest symmetric level on the signed b-bit grid
        if top < 1:
            raise ConfigError(
                f"resiliency: layer {name!r} has bits={bits}, which holds no symmetric odd grid: use bits >= 2"
            )
        if self.levels is None:
            return top
        if (self.levels - 1) // 2 > top:
            raise ConfigError(
                f"resiliency: levels={self.levels} does not fit layer {name!r} at bits={bits}: "
                f"allowed odd levels up to {2 * top + 1}, or raise quant.weight.bits"
            )
        return (self.levels - 1) // 2

    def unsupported(self, layer: nn.Module) -> str | None:
        """Why this method cannot run on ``layer``'s kind, or None (see ``lowbit.methods``)."""
        q = getattr(layer, "weight_quantizer", None)
        if q is not None and q.spec.binary is not None:
            return "its weight is on the binary grid {-s, +s}, which has no odd M-level grid to fit a step to"
        if isinstance(getattr(layer, "weight", None), nn.Parameter):
            return None
        return f"{type(layer).__name__} keeps no float weight to fit the L2-optimal step to"

    @torch.no_grad()
    def attach(self, model: nn.Module) -> None:
        layers = [(n, m) for n, m in quantized_layers(model) if getattr(m, "weight_quantizer", None) is not None]
        if not layers:
            raise ConfigError("resiliency: the model has no quantized weight (set quant.weight)")
        for name, mod in layers:
            q, weight = mod.weight_quantizer, mod.weight
            assert isinstance(q, Quantizer) and isinstance(weight, Tensor)
            if not q.symmetric or not bool(q.signed):
                raise ConfigError(
                    f"resiliency: layer {name!r} has an asymmetric or unsigned weight grid: "
                    "set quant.weight.symmetric=true and signed=null or true"
                )
            if q.int_transform is not None:
                raise ConfigError(
                    f"resiliency: layer {name!r} already has an integer transform "
                    f"({type(q.int_transform).__name__}); resiliency cannot share it"
                )
            lv = self._max_level(name, int(q.get_buffer("bits")))
            step = l2_optimal_step(range_rows(q, weight), lv, self.exact_limit)
            q.scale.copy_(step.reshape(q.scale.shape))
            q.scale.requires_grad_(False)  # a fixed step: the loop's optimizers skip it
            q.int_transform = LevelClamp(lv)

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> Tensor | None:
        return None

    def step(self, step: int) -> None:
        pass

    @torch.no_grad()
    def metrics(self, model: nn.Module) -> dict[str, Any]:
        """The share of quantized weights at level 0 (the sparsity that ternary weights reach)."""
        zeros = total = 0
        for _, mod in quantized_layers(model):
            q = getattr(mod, "weight_quantizer", None)
            if q is not None and isinstance(q.int_transform, LevelClamp):
                w_int = q.to_int(mod.weight)
                zeros, total = zeros + int((w_int == 0).sum()), total + w_int.numel()
        return {"zero_fraction": zeros / total} if total else {}

    def report(self, rows: list[dict[str, Any]]) -> Any:
        """This method's section of the run report: the share of weights at level 0 over QAT."""
        from lowbit.figures import Section, html_table, num

        body = [[str(r.get("step")), f"{100 * v:.2f}%"] for r in rows
                if r.get("stage") == "qat" and (v := num(r.get("zero_fraction"))) is not None]  # fmt: skip
        if not body:
            return Section("Resiliency", '<p class="note">No evaluation logged the share of zero weights yet.</p>')
        levels = "2^b − 1 per layer" if self.levels is None else str(self.levels)
        note = f"<p>M-level weights (M = {levels}) on L2-optimal fixed steps; share of weights at level 0:</p>"
        return Section("Resiliency", note + html_table(["QAT step", "zero weights"], body, (0, 1)))

    def state_dict(self) -> dict[str, Any]:
        return {}  # steps, grids and levels are buffers of the model

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
