"""Weight oscillations in QAT: tracking, dampening, iterative freezing (Nagel et al., ICML 2022).

With the straight-through estimator a latent weight whose optimum lies between two grid points does not
settle: the STE gradient pushes it back toward the rounding threshold from either side, so its integer
keeps flipping between the two neighbours. Flips corrupt batch-norm statistics (each is a step of size
``s``, worst with few weights per channel: depthwise convolutions) and hurt convergence.

Tracking (per weight element, in the integer domain, once per optimizer step, training only)::

    Δ^t = w_int^t − w_int^(t−1);  o^t = 1 if sign(Δ^t)·dir_last = −1 else 0
    f^t = m·o^t + (1 − m)·f^(t−1)           dir_last ← sign(Δ^t) where Δ^t ≠ 0

An oscillation is an integer change opposite to the previous non-zero change; ``f`` is its EMA frequency.

Dampening adds ``λ(t)·Σ_layers agg(‖sg(q(w)) − clip(w, s·(qmin−z), s·(qmax−z))‖²)`` to the loss: each
latent weight is pulled toward the centre of its current bin, away from the edges where flips happen;
clipped weights feel nothing, and the scale gets no gradient from it. ``λ`` is 0 for the first
``start`` fraction of the steps, then follows a cosine from ``lambda_start`` to ``lambda_final``.
Aggregation per layer: ``sum``, ``mean`` or ``kernel_mean`` (sum over output channels, mean over the
rest: the official code's default).

Freezing: once ``f > f_th(t)`` a weight's integer is fixed, for the rest of training, to
``round(ema_int)`` (the EMA of its integers, momentum ``m``, started when freezing becomes active). The
threshold is 0 (off) for the first ``start`` fraction, then a cosine from ``threshold_start`` to
``threshold_final``. The frozen integer keeps its grid index while the scale learns; the latent weight
gets no task gradient (the STE mask is zero there); ``convert`` and export see the frozen integers,
because the freeze lives in the quantizer's integer slot (``Quantizer.int_transform``).

All state (previous integers, directions, frequencies, EMA integers, frozen mask and values) is in
buffers of an ``OscillationTracker`` module installed as the weight quantizer's ``int_transform``, so
``state_dict``, ``.to()``, DDP and resume carry it. Layers above ``max_bits`` (the 8-bit first and last
layers) are not tracked or frozen; dampening applies to every quantized weight, as in the paper.

Deliberate departures from the official code (METHODS.md §1.10): tracking runs once per optimizer step
from the weights (not on every forward pass, so evaluation, BN re-estimation, gradient accumulation and
the dampening forward never touch it); momentum defaults to 0.01, since our runs are thousands, not
hundreds of thousands, of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError
from lowbit.quant import functional as F
from lowbit.quant.modules import quantized_layers
from lowbit.quant.quantizer import Quantizer

__all__ = [
    "OscillationTracker",
    "OscillationTracking",
    "OscillationDampening",
    "OscillationFreezing",
    "cosine_ramp",
    "dampening_loss",
    "HIST_EDGES",
]

HIST_EDGES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
AGGREGATIONS = ("sum", "mean", "kernel_mean")


def cosine_ramp(step: int, total: int, start: float, v0: float, v1: float, before: float) -> float:
    """``before`` for ``step < start·total``, then a cosine from ``v0`` (at ``start·total``) to ``v1`` (at the end)."""
    t_s = start * total
    if step < t_s:
        return before
    frac = min(1.0, (step - t_s) / max(total - t_s, 1e-12))
    return v1 + 0.5 * (v0 - v1) * (1.0 + math.cos(math.pi * frac))


def _check(name: str, value: float, lo: float, hi: float, what: str) -> float:
    """``value`` as a float if it is a number in [lo, hi], else a ``ConfigError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"{name}={value!r} is not allowed: {what}")
    return float(value)


class OscillationTracker(nn.Module):
    """Oscillation state of one weight tensor; as an ``int_transform`` it replaces frozen integers.

    Buffers are shaped like the quantizer's view of the weight (per-group quantizers see a 3-D view).
    """

    def __init__(self, x_int: Tensor, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("prev_int", x_int.detach().clone().float())
        self.register_buffer("last_dir", torch.zeros_like(x_int, dtype=torch.int8))
        self.register_buffer("freq", torch.zeros_like(x_int, dtype=torch.float32))
        self.register_buffer("ema_int", torch.zeros_like(x_int, dtype=torch.float32))
        self.register_buffer("frozen", torch.zeros_like(x_int, dtype=torch.bool))
        self.register_buffer("frozen_int", torch.zeros_like(x_int, dtype=torch.float32))
        self.register_buffer("ema_active", torch.tensor(False))
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.int64))
        self.register_buffer("oscillations", torch.tensor(0, dtype=torch.int64))  # total flips, for logs

    def passthrough(self) -> bool:
        """Nothing frozen yet: the quantizer may take its fused fast path (same values)."""
        return not bool(self.frozen.any())

    def forward(self, x_int: Tensor, quantizer: Quantizer) -> Tensor:
        return torch.where(self.frozen, self.frozen_int.to(x_int.dtype), x_int)

    @torch.no_grad()
    def update(self, raw_int: Tensor, step: int) -> int:
        """One tracking step from the raw (unfrozen) integers; idempotent per ``step``; returns the flips."""
        if int(self.last_step) == step:
            return 0
        self.last_step.fill_(step)
        x = torch.where(self.frozen, self.frozen_int, raw_int.float())
        m = self.momentum
        if bool(self.ema_active):
            self.ema_int.mul_(1 - m).add_(x, alpha=m)
        direction = torch.sign(torch.round(x - self.prev_int)).to(torch.int8)
        osc = (direction * self.last_dir) == -1
        self.freq.mul_(1 - m).add_(osc.float(), alpha=m)
        self.last_dir.copy_(torch.where(direction != 0, direction, self.last_dir))
        self.prev_int.copy_(x)
        flips = int(osc.sum())
        self.oscillations.add_(flips)
        return flips

    @torch.no_grad()
    def start_ema(self) -> None:
        if not bool(self.ema_active):
            self.ema_int.copy_(self.prev_int)
            self.ema_active.fill_(True)

    @torch.no_grad()
    def freeze(self, threshold: float, qmin: int, qmax: int, use_ema: bool = True, binary: bool = False) -> int:
        """Freeze every not-yet-frozen element with ``freq > threshold``; returns how many were frozen.
        On the binary grid the frozen value is the sign of the EMA (0 is not one of its integers)."""
        new = (self.freq > threshold) & ~self.frozen
        n = int(new.sum())
        if n:
            value = self.ema_int.round().clamp(qmin, qmax) if use_ema else self.prev_int
            if binary:
                value = torch.where((self.ema_int if use_ema else self.prev_int) >= 0, 1.0, -1.0)
            self.frozen_int.copy_(torch.where(new, value, self.frozen_int))
            self.frozen.logical_or_(new)
        return n


@torch.no_grad()
def _raw_int(layer: nn.Module) -> Tensor:
    """The layer's weight integers before any ``int_transform``, in its quantizer's view shape."""
    return layer.weight_quantizer.view(layer.weight_int(transform=False))


def _float_weight_only(layer: nn.Module) -> str | None:
    if isinstance(getattr(layer, "weight", None), nn.Parameter):
        return None
    return (
        f"{type(layer).__name__} trains no float latent weight (its integers come from a frozen Φ0 and "
        "adapters), so there is no latent weight to pull toward its bin centre"
    )


def dampening_loss(w: Tensor, q: Quantizer, aggregation: str = "kernel_mean") -> Tensor:
    """``agg(‖sg(q(w)) − clip(w, s·(qmin−z), s·(qmax−z))‖²)`` for one weight tensor (no tracking)."""
    qmin, qmax = q.int_grid()
    with torch.no_grad():
        s, z = q.qparams(w, qmax)
        zi = F.zero_point_int(z, qmin, qmax)
        sp = F.positive_scale(s, F.SCALE_EPS)
        half = 0.5 if q.stretched else 0.0  # the stretched grid's levels are (k + ½)·s
        target = F.dequantize(q.view(q.quantize_ste(w)) + half, sp, zi)  # the bin centre (frozen ints included)
        zero = zi if zi is not None else 0.0
        lo, hi = (qmin + half - zero) * sp, (qmax + half - zero) * sp
    wv = q.view(w)
    err = q.unview((target - torch.clamp(wv, lo, hi)).pow(2), w.shape)  # a ragged group's padding dropped
    if aggregation == "sum":
        return err.sum()
    if aggregation == "mean":
        return err.mean()
    return err.sum() * w.shape[0] / w.numel()  # kernel_mean: sum over output channels, mean over the rest


@dataclass(frozen=True)
class TrackingSettings:
    """``oscillation_tracking``: EMA ``momentum`` of the flip frequency, the widest bit width tracked
    (``max_bits``: the 8-bit first and last layers are left alone), the frequency reported as oscillating."""

    momentum: float = 0.01
    max_bits: int = 4
    report_threshold: float = 0.005

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", _check("momentum", self.momentum, 1e-9, 1.0, "use a value in (0, 1]"))
        mb = self.max_bits
        if isinstance(mb, bool) or not isinstance(mb, int) or not 1 <= mb <= 8:
            raise ConfigError(f"max_bits={mb!r} is not allowed: use an integer in 1..8")
        rt = _check("report_threshold", self.report_threshold, 0.0, 1.0, "use a value in [0, 1]")
        object.__setattr__(self, "report_threshold", rt)


@dataclass(frozen=True)
class DampeningSettings(TrackingSettings):
    """``oscillation_dampening``: ``λ`` is ``lambda_start`` until the ``start`` fraction of training, then a
    cosine to ``lambda_final``; per-layer ``aggregation`` of the regulariser."""

    lambda_start: float = 0.0
    lambda_final: float = 0.1
    start: float = 0.25
    aggregation: str = "kernel_mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = (
            ("lambda_start", math.inf, "use a value >= 0"),
            ("lambda_final", math.inf, "use a value >= 0"),
            ("start", 1.0, "use a fraction of training in [0, 1]"),
        )
        for n, hi, what in checks:
            object.__setattr__(self, n, _check(n, getattr(self, n), 0.0, hi, what))
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"aggregation={self.aggregation!r} is not allowed: use one of {', '.join(AGGREGATIONS)}"
            )


@dataclass(frozen=True)
class FreezingSettings(TrackingSettings):
    """``oscillation_freezing``: the threshold is off until the ``start`` fraction of training, then a cosine
    from ``threshold_start`` to ``threshold_final``; frozen integers are the EMA's (``use_ema``) or the last."""

    threshold_start: float = 0.1
    threshold_final: float = 0.01
    start: float = 0.25
    use_ema: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = (
            ("threshold_start", "use a frequency in [0, 1]"),
            ("threshold_final", "use a frequency in [0, 1]"),
            ("start", "use a fraction of training in [0, 1]"),
        )
        for n, what in checks:
            object.__setattr__(self, n, _check(n, getattr(self, n), 0.0, 1.0, what))
        if not isinstance(self.use_ema, bool):
            raise ConfigError(f"use_ema={self.use_ema!r} is not allowed: use true or false")


class OscillationTracking:
    """Tracks oscillations of every weight quantizer with ``bits <= max_bits``; reports them per eval."""

    Settings: type[TrackingSettings] = TrackingSettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        self.settings = s = self.Settings(**settings)
        self.total_steps = total_steps
        self.momentum, self.max_bits, self.report_threshold = s.momentum, s.max_bits, s.report_threshold
        self.layers: list[tuple[str, nn.Module, Quantizer, OscillationTracker]] = []

    def attach(self, model: nn.Module) -> None:
        self.layers = []
        for name, mod in quantized_layers(model):
            q = getattr(mod, "weight_quantizer", None)
            if q is None or int(q.bits) > self.max_bits:
                continue
            tracker = q.int_transform
            if tracker is None:
                tracker = OscillationTracker(_raw_int(mod), self.momentum)
                q.int_transform = tracker.to(q.bits.device)
            elif not isinstance(tracker, OscillationTracker):
                raise ConfigError(f"layer {name!r} already has another integer method ({type(tracker).__name__})")
            elif tracker.momentum != self.momentum:
                raise ConfigError(
                    f"momentum={self.momentum} differs from the {tracker.momentum} of an oscillation method already "
                    f"attached to {name!r}: give every oscillation method the same momentum"
                )
            self.layers.append((name, mod, q, tracker))

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> Tensor | None:
        return None

    def unsupported(self, layer: nn.Module) -> str | None:
        """Why this method cannot run on ``layer``'s kind, or None (see ``lowbit.methods``)."""
        if getattr(layer, "weight_quantizer", None) is not None and hasattr(layer, "base_int"):
            return f"{type(layer).__name__} keeps frozen round-to-nearest integers: nothing can oscillate"
        return None

    def step(self, step: int) -> None:
        for _, mod, _, tracker in self.layers:
            tracker.update(_raw_int(mod), step)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        total = osc = frozen = 0
        layers: dict[str, Any] = {}
        for name, _, q, t in self.layers:
            n = t.freq.numel()
            o = int(((t.freq > self.report_threshold) & ~t.frozen).sum())  # a frozen weight cannot flip
            fr = int(t.frozen.sum())
            hist = torch.histogram(t.freq.flatten().double().clamp(0, 1), torch.tensor(HIST_EDGES, dtype=torch.float64))
            layers[name] = {
                "bits": int(q.bits),
                "numel": n,
                "oscillating": o / n,
                "frozen": fr / n,
                "mean_freq": float(t.freq.mean()),
                "hist": [int(c) for c in hist.hist],
            }
            total, osc, frozen = total + n, osc + o, frozen + fr
        return {
            "oscillation": {
                "threshold": self.report_threshold,
                "oscillating": osc / max(total, 1),
                "frozen": frozen / max(total, 1),
                "tracked": total,
                "hist_edges": list(HIST_EDGES),
                "layers": layers,
            }
        }

    def report(self, rows: list[dict[str, Any]]) -> Any:
        """This method's section of the run report (``lowbit.methods.oscillation_report``)."""
        from lowbit.methods.oscillation_report import oscillation_section

        return oscillation_section(rows)

    def state_dict(self) -> dict[str, Any]:
        return {}  # everything lives in the trackers' buffers, inside the model's state_dict

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class OscillationDampening(OscillationTracking):
    """Tracking plus the dampening regulariser on every quantized weight (see the module docstring)."""

    Settings = DampeningSettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        super().__init__(total_steps, **settings)
        s = self.settings
        assert isinstance(s, DampeningSettings)
        self.lambda_start, self.lambda_final, self.start, self.aggregation = (
            s.lambda_start, s.lambda_final, s.start, s.aggregation
        )
        self.t = 0
        self.weights: list[tuple[nn.Module, Quantizer]] = []

    def unsupported(self, layer: nn.Module) -> str | None:
        return super().unsupported(layer) or _float_weight_only(layer)

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.weights = [
            (m, m.weight_quantizer)
            for _, m in quantized_layers(model)
            if getattr(m, "weight_quantizer", None) is not None
        ]

    def weight(self) -> float:
        """``λ(t)`` at the current step."""
        lam0, lam1 = self.lambda_start, self.lambda_final
        return cosine_ramp(self.t, self.total_steps, self.start, lam0, lam1, lam0)

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> Tensor | None:
        lam = self.weight()
        if lam == 0.0 or not self.weights:
            return None
        total = sum(dampening_loss(m.weight, q, self.aggregation) for m, q in self.weights)
        return lam * total

    def step(self, step: int) -> None:
        super().step(step)
        self.t = step

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = int(state.get("t", 0))


class OscillationFreezing(OscillationTracking):
    """Tracking plus iterative freezing of weights whose frequency passes ``f_th(t)``."""

    Settings = FreezingSettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        super().__init__(total_steps, **settings)
        s = self.settings
        assert isinstance(s, FreezingSettings)
        self.threshold_start, self.threshold_final, self.start, self.use_ema = (
            s.threshold_start, s.threshold_final, s.start, s.use_ema
        )

    def threshold(self, step: int) -> float:
        """``f_th(step)``: 0 (freezing off) during the warm-up, then the cosine."""
        return cosine_ramp(step, self.total_steps, self.start, self.threshold_start, self.threshold_final, 0.0)

    def step(self, step: int) -> None:
        th = self.threshold(step)
        if th > 0:
            for *_, t in self.layers:
                t.start_ema()
        super().step(step)
        if th > 0:
            for *_, q, t in self.layers:
                t.freeze(th, *q.int_grid(), use_ema=self.use_ema, binary=q.spec.binary is not None)
