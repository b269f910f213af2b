"""Optimizers for binary weights: CEMA (Quist, Li, van Gemert, ICLR 2023), Bop (Helwegen et al., NeurIPS 2019)
and the latent-weight Adam baseline.

A binary network sees only ``sign(w)`` of a latent weight ``w``. SGD with learning rate η and weight decay λ,

    w_{t+1} = (1 − ηλ)·w_t − η·g_t,

becomes, with α = ηλ and m = λ·w (a positive rescaling, so sign(m) = sign(w)),

    m_{t+1} = (1 − α)·m_t + α·(−g_t):

the latent weight is an exponential moving average of the negative gradients with smoothing factor α
(Quist et al. §3). η and λ matter only through their product; the initial magnitude only sets m_0, whose
effect dies out as (1 − α)^t; a learning-rate schedule schedules α; with λ = 0 the EMA becomes an unbounded
sum. Momentum puts a second first-order filter in series.

CEMA (cascaded EMA) makes the filter explicit. The parameter holds the binary weight w ∈ {−1, +1} (set to
sign(p) at construction, 0 → +1); two buffers, zero at the start and never reset after a flip, filter g:

    v ← (1 − γ)·v + γ·g          momentum_buffer, γ constant
    u ← (1 − α_t)·u + α_t·v      inertia_buffer (the latent weight), α_t = alpha·lr_t
    w ← −w  where u·w > 0        the filtered gradient points along w: move against it

Invariant after every step: w = −sign(u) wherever u ≠ 0; w keeps its sign where u = 0. There is no
threshold. The group's ``lr`` (default 1.0) is only α's decay multiplier, so a torch LR scheduler on the
optimizer schedules α (the paper: ``LambdaLR(1 − epoch/epochs)``); γ is not scheduled.

Bop (Helwegen, Widdicombe, Geiger, Liu, Cheng, Nusselder: "Latent weights do not exist: rethinking binarized
neural network optimization", NeurIPS 2019) keeps one EMA and flips against it past a threshold τ:

    m ← (1 − γ_t)·m + γ_t·g      momentum_buffer, γ_t = gamma·lr_t
    w ← −w  where |m| > τ and sign(m) = sign(w)

LatentAdam is the usual baseline (ReActNet, AdamBNN): Adam on float latent weights, then
w ← clamp(w, −clip, clip) after every step, the range where the straight-through estimator's hard-tanh mask
passes gradient.

All state lives in the optimizer's ``state`` (buffers shaped like their parameter, created at the first step
that has a gradient) and in the parameter groups (alpha, gamma, threshold, clip), so ``state_dict`` and
``load_state_dict`` resume bit-identically; every update is element-wise, hence deterministic. Parameters whose
``grad`` is None are skipped. Hyperparameters may be given per parameter group, as torch allows
(``CEMA([{"params": ps, "alpha": 1e-4, "gamma": 1e-2}])`` needs no other argument: that is how the training
loop builds method optimizers); each group is validated when it is added, and the scheduled rates
(alpha·lr, gamma·lr) at every step, since a scheduler or a loaded state sets ``lr``.

``inertia`` (CEMA, default 0: the paper) starts the inertia buffer at ``u_0 = −inertia·w_0`` from float
weights, before they become their signs. By the filter view this is the latent weight's initial state
(m_0 = λ·w_0): with u_0 = 0 the first step flips every weight whose first filtered gradient agrees with
it, which discards a pretrained float model's signs; a u_0 comparable to the filtered gradients keeps
them until the gradients disagree for long enough.

Departures from the official CEMA code (``optimizers/cema_optimizer.py``): sign(0) is +1 (its ``p.sign_()``
leaves 0, a weight that can then never flip since u·0 = 0); ``group["alpha"]`` keeps the value given, α_t is
computed each step instead of being written back beside an ``initial_alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Adam, Optimizer

from lowbit.errors import ConfigError

__all__ = ["CEMA", "Bop", "LatentAdam", "flip_ratio"]

Params = Iterable[Tensor] | Iterable[dict[str, Any]]


def flip_ratio(before: Tensor, after: Tensor) -> float:
    """Fraction of elements whose binary weight (sign, 0 counting as +1) differs; 0.0 for empty tensors."""
    if before.shape != after.shape:
        raise ValueError(f"flip_ratio needs tensors of one shape, got {tuple(before.shape)} and {tuple(after.shape)}")
    if before.numel() == 0:
        return 0.0
    return int(((before < 0) != (after < 0)).sum()) / before.numel()


def _binarize(x: Tensor) -> Tensor:
    """sign(x) with 0 (and −0.0) mapped to +1, in x's dtype."""
    return torch.ones_like(x).masked_fill_(x < 0, -1.0)


def _ema(x: Tensor, target: Tensor, rate: float) -> Tensor:
    # written out (two products, one sum, no fused lerp) so a naive scalar reference can match it bit for bit
    return x * (1.0 - rate) + target * rate


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(owner: str, name: str, value: Any, low: float, low_open: bool, high: float | None) -> None:
    ok = _is_number(value) and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        allowed = f"{'(' if low_open else '['}{low:g}, {'∞)' if high is None else f'{high:g}]'}"
        raise ConfigError(f"{owner}: {name}={value!r} is not allowed: it must be a finite number in {allowed}")


def _rate(owner: str, name: str, value: Any) -> float:
    """A step's EMA rate, checked at every step: schedulers and loaded state set ``lr`` after validation."""
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{owner}: {name}={value!r} is not allowed at this step: a rate must be in [0, 1]")
    return float(value)


def _grad(owner: str, p: Tensor) -> Tensor | None:
    if p.grad is not None and p.grad.is_sparse:
        raise RuntimeError(f"{owner} does not support sparse gradients")
    return p.grad


def _binarize_params(params: list[Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            p.copy_(_binarize(p))


class CEMA(Optimizer):
    """Cascaded EMA (Quist et al. 2023): parameters hold ±1; flip where the twice-filtered gradient u has w's sign.

    ``alpha`` and ``gamma`` in (0, 1]; left None, every parameter group must give its own. ``lr`` ≥ 0 only
    scales α (α_t = alpha·lr), for LR schedulers.
    """

    def __init__(
        self, params: Params, alpha: float | None = None, gamma: float | None = None, lr: float = 1.0,
        inertia: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(params, {"lr": lr, "alpha": alpha, "gamma": gamma, "inertia": inertia})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check("CEMA", "alpha", merged["alpha"], 0.0, True, 1.0)
        _check("CEMA", "gamma", merged["gamma"], 0.0, True, 1.0)
        _check("CEMA", "lr", merged["lr"], 0.0, False, None)
        _check("CEMA", "inertia", merged["inertia"], 0.0, False, None)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["inertia"] > 0:  # u_0 = −inertia·w_0: the latent weights' memory of a float start (see above)
            for p in group["params"]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["inertia_buffer"] = -group["inertia"] * p.detach().clone()
        _binarize_params(group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha_t = _rate("CEMA", f"alpha·lr={group['alpha']!r}·{group['lr']!r}", group["alpha"] * group["lr"])
            gamma = _rate("CEMA", "gamma", group["gamma"])
            for p in group["params"]:
                g = _grad("CEMA", p)
                if g is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["inertia_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                v, u = state["momentum_buffer"], state["inertia_buffer"]  # shaped like p
                v.copy_(_ema(v, g, gamma))
                u.copy_(_ema(u, v, alpha_t))
                p.copy_(torch.where(u * p > 0, -p, p))  # p is ±1, so u·p is exact and 0 only where u is
        return loss


class Bop(Optimizer):
    """Binary optimizer (Helwegen et al. 2019): parameters hold ±1; flip where |m| > threshold and sign(m) = sign(w).

    ``threshold`` ≥ 0, ``gamma`` in (0, 1]; left None, every parameter group must give its own. ``lr`` ≥ 0 only
    scales γ (γ_t = gamma·lr), for LR schedulers.
    """

    def __init__(
        self, params: Params, threshold: float | None = None, gamma: float | None = None, lr: float = 1.0
    ) -> None:
        super().__init__(params, {"lr": lr, "threshold": threshold, "gamma": gamma})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        _check("Bop", "threshold", merged["threshold"], 0.0, False, None)
        _check("Bop", "gamma", merged["gamma"], 0.0, True, 1.0)
        _check("Bop", "lr", merged["lr"], 0.0, False, None)
        super().add_param_group(param_group)
        _binarize_params(self.param_groups[-1]["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            gamma_t = _rate("Bop", f"gamma·lr={group['gamma']!r}·{group['lr']!r}", group["gamma"] * group["lr"])
            threshold = group["threshold"]
            for p in group["params"]:
                g = _grad("Bop", p)
                if g is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["momentum_buffer"]  # shaped like p
                m.copy_(_ema(m, g, gamma_t))
                p.copy_(torch.where((m.abs() > threshold) & (m * p > 0), -p, p))
        return loss


def _clamp_latent(opt: Optimizer, args: Any, kwargs: Any) -> None:
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.clamp_(-group["clip"], group["clip"])


class LatentAdam(Adam):
    """Adam on latent float weights, then ``w ← clamp(w, −clip, clip)`` for every parameter it stepped.

    ``clip`` > 0 is a parameter-group key (saved in ``state_dict``). The clamp runs as the first step post-hook,
    not in an overridden ``step``: calling ``Adam.step`` from one would fire every step hook twice once torch
    has wrapped both classes' ``step``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip: float = 1.0,
    ) -> None:
        _check("LatentAdam", "clip", clip, 0.0, True, None)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.defaults["clip"] = clip
        for group in self.param_groups:
            group.setdefault("clip", clip)
        self.register_step_post_hook(_clamp_latent)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "clip" in param_group:
            _check("LatentAdam", "clip", param_group["clip"], 0.0, True, None)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # pickling and deepcopy drop hooks; put the clamp back
        self.register_step_post_hook(_clamp_latent)
