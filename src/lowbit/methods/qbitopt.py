"""QBitOpt: per-layer weight bit widths reallocated during QAT under a hard budget (Peters et al. 2023).

Sensitivity. A second-order expansion of the loss with the empirical Fisher in place of the Hessian,
and quantization noise uniform with variance ``Δ²/12`` per weight (``Δ = range / (2^b − 1)``), gives per
layer ``l`` and per scale element ``k`` of its weight quantizer (per tensor, channel or group)::

    Ω_l(b) = ½ Σ_k Tr(F_lk) · Δ_lk(b)² / 12 = c_l · (2^b − 1)^(−2),    c_l = Σ_k Tr(F_lk) · range_lk² / 24

``Tr(F_lk)`` is the EMA (``momentum``) over training steps of ``Σ_i (∂L/∂w_i)²`` over the weights ``i`` of
scale element ``k``: the squared gradients of the latent weights that QAT computes anyway (FIT), read
through each layer's ``watch_weight_grad`` (for LR-QAT: the gradient w.r.t. its dequantized weight).
``range_lk = |s_lk| · (qmax − qmin)`` is read at each allocation (``set_bits`` keeps it). ``sensitivity:
hutchinson`` replaces ``Tr(F_lk)`` by Hutchinson's Hessian trace ``E_v[v ⊙ Hv]`` (Rademacher ``v``, HAWQ-v2)
over ``probe_batches`` batches at each allocation, clipped at 0 (Hessian-vector products: torch ops).

Budgets, exactly one (every allocation is checked against the model itself afterwards):

- ``average_bits``: ``Σ_l n_l b_l ≤ average_bits · Σ_l n_l`` over the layers QBitOpt allocates (pinned
  layers, e.g. the first and last at 8 bits, are outside it, so a uniform b-bit model with the same
  pins has the average b; ``summary.json``'s ``weight_bits`` is the whole model's mean);
- ``max_bytes``: ``lowbit.quant.size.payload_bytes`` of the model (packed weights at their own widths,
  scales, everything that stays float; the saved file adds its header) ``≤ max_bytes``;
- ``max_bops``: ``Σ_l MAC_l · b_l · a_l ≤ max_bops`` per sample (MACs measured on one batch; ``a_l``
  the input quantizer's bits, 32 where the input stays float). Activation bits are not allocated.

Allocation (``lowbit.methods.qbitopt_solve``): ``min Σ_l Ω_l(b_l)`` subject to the budget, ``b_l`` in
``candidates``; ``solver: relaxed`` is the paper's convex relaxation with feasible rounding, ``exact`` the
integer optimum (HiGHS). Both meet the budget; an infeasible one is a ConfigError naming the smallest one.

Loop. At the start of QAT the widths are uniform (``init: uniform``: the widest candidate that fits,
then the rounding's greedy fill by the weights' own quantization error where the budget leaves room)
or allocated from sensitivities measured on ``probe_batches`` batches of the pretrained model
(``init: sensitivity``, HAWQ-style; with ``tau: 0`` that is the one-shot baseline). Every ``tau``
steps after that the widths are reallocated, up or down, until the last ``freeze`` fraction of
training. A width change keeps each quantizer's range (``layer.set_bits``). Every allocation (bits
per layer, budget used, objective, sensitivities) goes into the next ``metrics.jsonl`` row and the
report; the Fisher EMAs, the allocation history and the rows not yet logged are in ``state_dict``, so
a resumed run reallocates exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lowbit import distributed
from lowbit.errors import ConfigError, FormatError
from lowbit.methods.qbitopt_solve import DEFAULT_CANDIDATES, allocate_exact, allocate_relaxed, fill, objective
from lowbit.quant import functional as F
from lowbit.quant import kernels
from lowbit.quant.modules import quantized_layers
from lowbit.quant.quantizer import Quantizer
from lowbit.quant.size import payload_bytes, weight_numel

__all__ = ["QBitOpt", "QBitOptSettings", "per_scale"]

log = logging.getLogger(__name__)

BUDGETS = ("average_bits", "max_bytes", "max_bops")
SOLVERS: dict[str, Callable[..., np.ndarray]] = {"relaxed": allocate_relaxed, "exact": allocate_exact}
SENSITIVITIES = ("fisher", "hutchinson")
INITS = ("uniform", "sensitivity")
_PROBE_SEED = 0x5EED  # Rademacher vectors: a generator seeded from this and the step, the global RNG untouched


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class QBitOptSettings:
    """``qbitopt``: exactly one budget (``average_bits``, ``max_bytes``, ``max_bops``); ``candidates`` the
    widths a layer may take; ``solver`` relaxed | exact; ``sensitivity`` fisher | hutchinson; ``tau``
    steps between allocations (0: never after the first); ``freeze`` the last fraction of training
    without reallocation; ``momentum`` of the Fisher EMA; ``init`` uniform | sensitivity;
    ``probe_batches`` for ``init: sensitivity`` and Hutchinson; ``pin_first_last`` keeps the first and
    last quantized layers at their prepared widths; ``pin`` maps layer-name globs to a width (null: the
    prepared width), first match wins."""

    average_bits: float | None = None
    max_bytes: int | None = None
    max_bops: float | None = None
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES
    solver: str = "relaxed"
    sensitivity: str = "fisher"
    tau: int = 250
    freeze: float = 0.2
    momentum: float = 0.01
    init: str = "uniform"
    probe_batches: int = 8
    pin_first_last: bool = True
    pin: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = [k for k in BUDGETS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"qbitopt needs exactly one budget, one of {', '.join(BUDGETS)}; got {given or 'none'}")
        budget = getattr(self, given[0])
        if not _positive(budget) or (given[0] == "max_bytes" and not _is_int(budget)):
            what = "an integer > 0" if given[0] == "max_bytes" else "a finite number > 0"
            raise ConfigError(f"{given[0]}={budget!r} is not allowed: use {what}")
        c = self.candidates
        if not c or not all(_is_int(b) and 1 <= b <= 8 for b in c) or list(c) != sorted(set(c)):
            raise ConfigError(f"candidates={list(c)!r} is not allowed: use sorted, distinct integers in 1..8")
        for name, value, allowed in (("solver", self.solver, tuple(SOLVERS)),
                                     ("sensitivity", self.sensitivity, SENSITIVITIES), ("init", self.init, INITS)):
            if value not in allowed:
                raise ConfigError(f"{name}={value!r} is not allowed: use one of {', '.join(allowed)}")
        if not _is_int(self.tau) or self.tau < 0:
            raise ConfigError(f"tau={self.tau!r} is not allowed: use an integer >= 0 (0: no reallocation)")
        if not _is_int(self.probe_batches) or self.probe_batches < 1:
            raise ConfigError(f"probe_batches={self.probe_batches!r} is not allowed: use an integer >= 1")
        if isinstance(self.freeze, bool) or not isinstance(self.freeze, int | float) or not 0 <= self.freeze <= 1:
            raise ConfigError(f"freeze={self.freeze!r} is not allowed: use a fraction in [0, 1]")
        if not _positive(self.momentum) or self.momentum > 1:
            raise ConfigError(f"momentum={self.momentum!r} is not allowed: use a number in (0, 1]")
        for glob, bits in self.pin.items():
            if not isinstance(glob, str) or not (bits is None or (_is_int(bits) and 1 <= bits <= 8)):
                raise ConfigError(f"pin.{glob}={bits!r} is not allowed: map a layer-name glob to 1..8 or null")


def per_scale(q: Quantizer, t: Tensor) -> Tensor:
    """``t`` (shaped like the quantizer's tensor) summed over the elements that share each scale: the
    result has ``q.scale``'s shape (``()`` per tensor, ``(C,)`` per channel, ``(rows, groups)`` per group)."""
    v = q.view(t)
    if q.granularity == "tensor":
        return v.sum()
    if q.granularity == "group":
        return v.sum(-1)
    axis = q.axis % v.dim()
    return v.sum([d for d in range(v.dim()) if d != axis])


class QBitOpt:
    """Peters et al. 2023: FIT (or Hutchinson) sensitivities, allocation under a hard budget every ``tau`` steps."""

    Settings = QBitOptSettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        self.settings = QBitOptSettings(**settings)
        self.total_steps = total_steps
        self.model: nn.Module | None = None
        self.layers: list[tuple[str, nn.Module]] = []  # every layer with a quantized weight, in module order
        self.pinned: list[int | None] = []
        self.fisher: dict[str, Tensor] = {}  # EMA of Σ grad² per scale element (q.scale's shape)
        self.ema_updates = 0
        self.macs: list[float] = []  # per sample, measured at start for a BOPs budget
        self.history: list[dict[str, Any]] = []  # every allocation, in order
        self.pending: list[dict[str, Any]] = []  # allocations the next metrics row has not yet logged
        self.initialized = False
        self._squares: dict[str, Tensor] = {}  # this step's Σ grad², from the layers' gradient hooks
        self._handles: list[Any] = []
        self._collect = True
        self._losses: Callable[[int], Iterator[Tensor]] | None = None

    # -- the method contract: unsupported, attach, ... --------------------------------------------------
    def unsupported(self, layer: nn.Module) -> str | None:
        if getattr(layer, "weight_quantizer", None) is None:
            return None  # a float weight is left alone
        if layer.weight_quantizer.spec.binary is not None:
            return "its weight is on the binary grid {-s, +s}, which has no other bit widths to allocate"
        if why := getattr(layer, "set_bits_unsupported", lambda: None)():  # e.g. LR-QAT's frozen zero point
            return why
        if isinstance(w := getattr(layer, "weight", None), nn.Parameter) and not w.requires_grad:
            return (f"{type(layer).__name__}'s weight is frozen (a quantized embedding under freeze_unquantized), so "
                    "no gradient measures its sensitivity: leave quant.embedding out or train the table")  # fmt: skip
        if not callable(getattr(layer, "watch_weight_grad", None)):
            return (f"{type(layer).__name__} keeps its integer weights out of the backward pass, so no weight "
                    "gradient measures its sensitivity (use lowrank variant lrqat)")  # fmt: skip
        if self.settings.sensitivity == "hutchinson" and not isinstance(w, nn.Parameter):
            return (f"sensitivity: hutchinson differentiates twice w.r.t. a latent weight parameter; "
                    f"{type(layer).__name__} builds its weight from Φ0 and adapters: use fisher")  # fmt: skip
        return None

    def attach(self, model: nn.Module) -> None:
        s = self.settings
        self.model = model
        self.layers = [(n, m) for n, m in quantized_layers(model) if m.weight_quantizer is not None]
        if not self.layers:
            raise ConfigError("qbitopt: the model has no quantized weight (set quant.weight)")
        last = len(self.layers) - 1
        self.pinned = []
        for i, (name, layer) in enumerate(self.layers):
            glob = next((g for g in s.pin if fnmatch.fnmatchcase(name, g)), None)
            own = layer.weight_quantizer.nbits if glob is not None or (s.pin_first_last and i in (0, last)) else None
            self.pinned.append(s.pin[glob] if glob is not None and s.pin[glob] is not None else own)
        if all(p is not None for p in self.pinned):
            raise ConfigError("qbitopt: every quantized layer is pinned, so there is nothing to allocate")
        for (_, layer), pin in zip(self.layers, self.pinned, strict=True):
            if pin is not None and layer.weight_quantizer.nbits != pin:
                layer.set_bits(pin)
        self.fisher = {n: torch.zeros_like(m.weight_quantizer.scale, dtype=torch.float32).detach()
                       for n, m in self.layers}  # fmt: skip
        self._handles = [m.watch_weight_grad(self._grad_hook(n, m.weight_quantizer)) for n, m in self.layers]

    def _grad_hook(self, name: str, q: Quantizer) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if self._collect:
                sq = per_scale(q, grad.detach().float().square())
                prev = self._squares.get(name)
                self._squares[name] = sq if prev is None else prev + sq

        return hook

    def start(self, model: nn.Module, losses: Callable[[int], Iterator[Tensor]], step: int) -> None:
        """Keep the stage's loss source; on a fresh start measure what the budget needs and allocate."""
        self._losses = losses
        if self.initialized:
            return
        if self.settings.max_bops is not None:
            self.macs = self._measure_macs(losses(step))
        self._check_feasible()
        if self.settings.init == "sensitivity":
            self._probe_fisher(losses(step))
            c = self._coefficients(self.fisher)
            bits = self._solve(c)
        else:
            c = self._weight_error()
            w, f, budget = self._costs()
            fits = [b for b in self.settings.candidates if np.sum(w * b + f) <= budget + 1e-9 * max(1.0, abs(budget))]
            start = np.full(len(w), max(fits))  # the widest uniform width that fits, then the greedy fill
            bits = self._full(fill(c, w, f, budget, start, self.settings.candidates))
        self._apply(bits, step, f"init:{self.settings.init}", c)
        self.initialized = True

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> Tensor | None:
        return None

    def step(self, step: int) -> None:
        if self._squares:
            m = self.settings.momentum  # under torchrun, the ranks' squared gradients are averaged first
            distributed.average_tensors([self._squares[n] for n in sorted(self._squares)])
            for name, sq in self._squares.items():
                f = self.fisher[name]
                if self.ema_updates == 0:
                    f.copy_(sq)
                else:
                    f.mul_(1 - m).add_(sq, alpha=m)
            self.ema_updates += 1
            self._squares.clear()
        s = self.settings
        due = s.tau and step % s.tau == 0 and step <= (1 - s.freeze) * self.total_steps and step < self.total_steps
        if self.initialized and due:
            traces = self._hutchinson(step) if s.sensitivity == "hutchinson" else self.fisher
            c = self._coefficients(traces)
            self._apply(self._solve(c), step, s.sensitivity, c)

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        """The allocations since the last row, and the widths and budget use now."""
        out = {"qbitopt": {"allocations": self.pending, **self._usage()}}
        self.pending = []
        return out

    def finish(self, model: nn.Module, batches: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def report(self, rows: list[dict[str, Any]]) -> Any:
        from lowbit.methods.qbitopt_report import qbitopt_section

        return qbitopt_section(rows, self.settings)

    # -- budgets -----------------------------------------------------------------------------------------
    def _budget(self) -> tuple[str, float]:
        kind = next(k for k in BUDGETS if getattr(self.settings, k) is not None)
        return kind, float(getattr(self.settings, kind))

    def _free(self) -> list[int]:
        return [i for i, p in enumerate(self.pinned) if p is None]

    def _numel(self, i: int) -> int:
        return weight_numel(self.layers[i][1])

    def _act_bits(self, i: int) -> int:
        iq = self.layers[i][1].input_quantizer
        return 32 if iq is None else iq.nbits

    def _costs(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(w, f, budget) over the free layers: cost_l(b) = w_l·b + f_l ≥ the true cost, and budget."""
        kind, limit = self._budget()
        free = self._free()
        n = np.array([self._numel(i) for i in free], dtype=float)
        if kind == "average_bits":
            return n, np.zeros_like(n), limit * float(n.sum())
        if kind == "max_bytes":
            assert self.model is not None
            variable = sum(-(-self._numel(i) * self.layers[i][1].weight_quantizer.nbits // 8) for i in free)
            fixed = payload_bytes(self.model) - variable  # everything that does not depend on the free widths
            # ceil(n·b/8) ≤ n·b/8 + 7/8, and = n·b/8 when 8 divides n
            return n / 8, np.where(n % 8 == 0, 0.0, 7 / 8), limit - fixed
        a = np.array([self._act_bits(i) for i in free], dtype=float)
        macs = np.array([self.macs[i] for i in free], dtype=float)
        pinned = sum(self.macs[i] * self._act_bits(i) * p for i, p in enumerate(self.pinned) if p is not None)
        return macs * a, np.zeros_like(n), limit - pinned

    def _check_feasible(self) -> None:
        w, f, budget = self._costs()
        least = float(np.sum(w * min(self.settings.candidates) + f))
        if least <= budget + 1e-9 * max(1.0, abs(budget)):
            return
        kind, limit = self._budget()
        # budget = limit·Σn (average bits) or limit − what the free widths do not change (bytes, BOPs)
        smallest = least / float(w.sum()) if kind == "average_bits" else limit - budget + least
        raise ConfigError(
            f"qbitopt: {kind}={limit:g} is infeasible: the smallest feasible value is {smallest:.10g} "
            f"(every free layer at {min(self.settings.candidates)} bits, pinned layers at their widths)"
        )

    def _usage(self) -> dict[str, Any]:
        """The budget as the model stands now, measured on it (not from the solver's cost model)."""
        kind, limit = self._budget()
        free = self._free()
        if kind == "average_bits":
            n = sum(self._numel(i) for i in free)
            used = sum(self._numel(i) * self.layers[i][1].weight_quantizer.nbits for i in free) / n
        elif kind == "max_bytes":
            assert self.model is not None
            used = float(payload_bytes(self.model))
        else:
            used = float(sum(self.macs[i] * self._act_bits(i) * self.layers[i][1].weight_quantizer.nbits
                             for i in range(len(self.layers))))  # fmt: skip
        bits = {n: m.weight_quantizer.nbits for n, m in self.layers}
        return {"budget": kind, "limit": limit, "used": used, "met": used <= limit * (1 + 1e-9), "bits": bits}

    # -- sensitivities -----------------------------------------------------------------------------------
    def _coefficients(self, traces: dict[str, Tensor]) -> np.ndarray:
        """c_l = Σ_k trace_lk · range_lk² / 24 for the free layers."""
        out = []
        for i in self._free():
            name, layer = self.layers[i]
            q = layer.weight_quantizer
            qmin, qmax = q.int_grid()
            rng = F.positive_scale(q.scale.detach(), F.SCALE_EPS).float() * (qmax - qmin)
            out.append(float((traces[name].clamp_min(0) * rng.square()).sum()) / 24)
        return np.array(out)

    @torch.no_grad()
    def _measure_macs(self, losses: Iterator[Tensor]) -> list[float]:
        """Multiply-accumulates per sample of each layer, from its output shape on one batch: the weight's
        elements times the outputs per sample and channel (a conv's H·W, a linear's tokens per sequence)."""
        found: dict[int, float] = {}

        def recorder(i: int) -> Callable[..., None]:
            def hook(mod: nn.Module, args: Any, out: Tensor) -> None:
                channels = int(getattr(mod, "out_channels", 0) or mod.out_features)
                found[i] = self._numel(i) * out.numel() / (out.shape[0] * channels)

            return hook

        handles = [layer.register_forward_hook(recorder(i)) for i, (_, layer) in enumerate(self.layers)]
        try:
            with self._probing(collect=False):
                next(losses)
        finally:
            for h in handles:
                h.remove()
        missing = [self.layers[i][0] for i in range(len(self.layers)) if i not in found]
        if missing:
            raise ConfigError(f"qbitopt: max_bops needs every quantized layer to run, but {missing[:3]} did not")
        return [found[i] for i in range(len(self.layers))]

    @contextlib.contextmanager
    def _probing(self, collect: bool) -> Iterator[None]:
        """Eval mode (batch-norm statistics untouched) while probing; gradients collected only if ``collect``."""
        assert self.model is not None
        was, self._collect = self.model.training, collect
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)
            self._collect = True

    def _probe_fisher(self, losses: Iterator[Tensor]) -> None:
        """Fisher traces of the model as it is, averaged over ``probe_batches`` batches (HAWQ-style start)."""
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.requires_grad]
        total = {n: torch.zeros_like(f) for n, f in self.fisher.items()}
        k = self.settings.probe_batches
        for _ in range(k):
            with self._probing(collect=True):
                torch.autograd.grad(next(losses), params, allow_unused=True)
            for name, sq in self._squares.items():
                total[name] += sq
            self._squares.clear()
        for name, f in self.fisher.items():
            f.copy_(total[name] / k)
        self.ema_updates = 1

    def _hutchinson(self, step: int) -> dict[str, Tensor]:
        """``E_v[Σ_{i in k} v_i (Hv)_i]`` per scale element, Rademacher ``v``, over ``probe_batches`` batches."""
        assert self._losses is not None, "qbitopt: start() was not called"
        params = [layer.weight for _, layer in self.layers]
        gen = torch.Generator().manual_seed(_PROBE_SEED + step)
        total = {n: torch.zeros_like(f) for n, f in self.fisher.items()}
        losses = self._losses(step)
        with self._probing(collect=False), kernels.torch_ops():
            for _ in range(self.settings.probe_batches):
                grads = torch.autograd.grad(next(losses), params, create_graph=True)
                vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
                hvs = torch.autograd.grad(grads, params, grad_outputs=vs)
                for (name, layer), v, hv in zip(self.layers, vs, hvs, strict=True):
                    total[name] += per_scale(layer.weight_quantizer, (v * hv).detach().float())
        return {n: t / self.settings.probe_batches for n, t in total.items()}

    # -- allocation --------------------------------------------------------------------------------------
    def _solve(self, c: np.ndarray) -> list[int]:
        w, f, budget = self._costs()
        bits = SOLVERS[self.settings.solver](c, w, f, budget, self.settings.candidates)
        return self._full(bits)

    def _full(self, free_bits: Any) -> list[int]:
        it = iter(int(b) for b in free_bits)
        return [p if p is not None else next(it) for p in self.pinned]

    def _weight_error(self) -> np.ndarray:
        """c_l with the Fisher replaced by the identity: the weights' own rounding error, for the start."""
        return self._coefficients({n: torch.ones_like(t) for n, t in self.fisher.items()})

    def _apply(self, bits: list[int], step: int, source: str, c: np.ndarray) -> None:
        before = [m.weight_quantizer.nbits for _, m in self.layers]
        for (_, layer), b, old in zip(self.layers, bits, before, strict=True):
            if b != old:
                layer.set_bits(b)
        usage = self._usage()
        if not usage["met"]:
            raise RuntimeError(f"qbitopt: allocation at step {step} uses {usage['used']} > {usage['limit']}")
        free = self._free()
        entry = {
            "step": step,
            "source": source,
            "changed": sum(b != o for b, o in zip(bits, before, strict=True)),
            "objective": objective(c, [bits[i] for i in free]) if c.size else 0.0,
            "sensitivity": {self.layers[i][0]: float(ci) for i, ci in zip(free, c, strict=True)},
            **usage,
        }
        self.history.append(entry)
        self.pending.append(entry)
        log.info("qbitopt: step %d, %s, %d layers changed, %s %.6g of %.6g", step, source, entry["changed"],
                 usage["budget"], usage["used"], usage["limit"])  # fmt: skip

    # -- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "fisher": {n: t.clone() for n, t in self.fisher.items()},
            "ema_updates": self.ema_updates,
            "macs": list(self.macs),
            "history": self.history,
            "pending": self.pending,
            "initialized": self.initialized,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def bad(key: str, value: Any, allowed: str) -> FormatError:
            return FormatError(f"qbitopt state: {key}={str(value)[:80]!r} is not allowed: {allowed}")

        if not isinstance(state, dict) or set(state) != {"fisher", "ema_updates", "macs", "history", "pending",
                                                         "initialized"}:  # fmt: skip
            raise bad("keys", list(state) if isinstance(state, dict) else state, "the keys this method writes")
        fisher = state["fisher"]
        if not isinstance(fisher, dict) or set(fisher) != set(self.fisher):
            raise bad("fisher", list(fisher) if isinstance(fisher, dict) else fisher, "one entry per quantized layer")
        for name, t in fisher.items():
            want = self.fisher[name]
            if not isinstance(t, Tensor) or t.shape != want.shape or not t.is_floating_point():
                raise bad(f"fisher.{name}", getattr(t, "shape", t), f"a float tensor of shape {tuple(want.shape)}")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise bad(f"fisher.{name}", "values", "finite and >= 0")
        n = state["ema_updates"]
        if not _is_int(n) or n < 0:
            raise bad("ema_updates", n, "an integer >= 0")
        macs = state["macs"]
        if not isinstance(macs, list) or (macs and (len(macs) != len(self.layers) or not all(
                isinstance(v, int | float) and math.isfinite(v) and v >= 0 for v in macs))):  # fmt: skip
            raise bad("macs", macs, f"empty or {len(self.layers)} finite numbers >= 0")
        for key in ("history", "pending"):
            if not isinstance(state[key], list) or not all(isinstance(e, dict) for e in state[key]):
                raise bad(key, state[key], "a list of allocation records")
        if not isinstance(state["initialized"], bool):
            raise bad("initialized", state["initialized"], "true or false")
        for name, t in fisher.items():
            self.fisher[name].copy_(t)
        self.ema_updates, self.macs = n, [float(v) for v in macs]
        self.history, self.pending = list(state["history"]), list(state["pending"])
        self.initialized = state["initialized"]
