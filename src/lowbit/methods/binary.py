"""Binary networks (Quist, Li, van Gemert, ICLR 2023; Helwegen et al. 2019): who optimizes the binary weights.

A binary layer is an ordinary quantized layer whose weight quantizer is on the binary grid
(``QuantSpec.binary``: ``y = s·sign(w)``, integers −1 and +1, stored at 1 bit), and whose input may be
binarised the same way (sign with the ApproxSign or clipped straight-through gradient). This method
routes the weights of those layers to a binary optimizer through the loop's ``param_groups`` hook;
everything else (batch norm, biases, RPReLU, the 8-bit first and last layers, scales) stays with the
stage's optimizers:

- ``optimizer: cema``: CEMA, two cascaded EMAs of the gradient, the parameter holding ±1 itself
  (``lowbit.methods.binary_optim``: ``v ← (1−γ)v + γg``, ``u ← (1−α_t)u + α_t v``, flip where ``u·w > 0``);
  α is scheduled by the stage's schedule (``α_t = alpha · schedule(t)``), γ is not. 3 hyperparameters.
- ``optimizer: bop``: Bop, one EMA and a threshold (flip where ``|m| > threshold`` and ``sign(m) = sign(w)``),
  γ scheduled.
- ``optimizer: adam``: the usual baseline, Adam on latent float weights clipped to ``[−clip, clip]``,
  learning rate ``lr`` on the stage's schedule.

Under CEMA and Bop the float weights become their signs when training starts (the float model's
magnitudes are dropped; batch norm absorbs the scale), so a binary layer for them is best given
``binary: {scale: one}`` or ``mean_abs`` (which is then 1).

Diagnostics: the flip ratio, the fraction of binary weights whose sign changed in an optimizer step,
averaged over the steps since the previous evaluation (``flip_ratio`` in ``metrics.jsonl``, with the
last step's ``flip_ratio_last``), and plotted in the report (AdamBNN's ``ff_ratio``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError, FormatError
from lowbit.methods.binary_optim import CEMA, Bop, LatentAdam
from lowbit.quant.modules import quantized_layers

__all__ = ["Binary", "BinarySettings", "binary_layers"]

OPTIMIZERS = ("cema", "bop", "adam")


def binary_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The quantized layers whose weight is on the binary grid, in module order."""
    return [(n, m) for n, m in quantized_layers(model)
            if m.weight_quantizer is not None and m.weight_quantizer.spec.binary is not None]  # fmt: skip


def _positive(name: str, v: Any, top: float | None = None) -> None:
    ok = not isinstance(v, bool) and isinstance(v, int | float) and 0 < v < float("inf") and (top is None or v <= top)
    if not ok:
        raise ConfigError(f"{name}={v!r} is not allowed: use a number in (0, {top if top is not None else 'inf'}]")


@dataclass(frozen=True)
class BinarySettings:
    """``binary``: ``optimizer`` cema | bop | adam; CEMA's ``alpha``, ``gamma`` and ``inertia`` (u_0 = −inertia·w
    from the float weights; 0: the paper's empty start); Bop's ``threshold`` and ``gamma``; Adam's ``lr`` and
    ``clip`` (latent weights)."""

    optimizer: str = "cema"
    alpha: float = 1e-3
    gamma: float = 1e-2
    inertia: float = 0.0
    threshold: float = 1e-6
    lr: float = 1e-3
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not allowed: use one of {', '.join(OPTIMIZERS)}")
        _positive("alpha", self.alpha, 1.0)
        _positive("gamma", self.gamma, 1.0)
        _positive("lr", self.lr)
        _positive("clip", self.clip)
        if isinstance(self.inertia, bool) or not isinstance(self.inertia, int | float) or not 0 <= self.inertia < 1e6:
            raise ConfigError(f"inertia={self.inertia!r} is not allowed: use a number in [0, 1e6)")
        th = self.threshold
        if isinstance(th, bool) or not isinstance(th, int | float) or not 0 <= th < 1e6:
            raise ConfigError(f"threshold={self.threshold!r} is not allowed: use a number in [0, 1e6)")


class Binary:
    """Routes binary weights to CEMA, Bop or latent-weight Adam, and measures how often they flip."""

    Settings = BinarySettings

    def __init__(self, total_steps: int, **settings: Any) -> None:
        self.settings = BinarySettings(**settings)
        self.layers: list[tuple[str, nn.Module]] = []
        self.signs: dict[str, Tensor] = {}  # each binary weight's sign after the last step (int8)
        self.flips = 0.0  # summed per-step flip ratios since the last metrics row
        self.steps = 0
        self.last = 0.0

    def unsupported(self, layer: nn.Module) -> str | None:
        q = getattr(layer, "weight_quantizer", None)
        if q is None or q.spec.binary is None or isinstance(getattr(layer, "weight", None), nn.Parameter):
            return None
        return f"{type(layer).__name__} has no latent weight parameter for a binary optimizer to own"

    def attach(self, model: nn.Module) -> None:
        self.layers = binary_layers(model)
        if not self.layers:
            raise ConfigError("binary: the model has no binary weight: set quant.weight.binary (and bits: 1)")
        self.signs = {n: self._sign(m.weight) for n, m in self.layers}

    @staticmethod
    def _sign(w: Tensor) -> Tensor:
        return torch.where(w.detach() < 0, -1, 1).to(torch.int8)  # sign(0) = +1, as the grid

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        s = self.settings
        params = [m.weight for _, m in self.layers]
        if s.optimizer == "cema":
            return [{"params": params, "optimizer": CEMA, "alpha": s.alpha, "gamma": s.gamma, "lr": 1.0,
                     "inertia": s.inertia, "schedule": True}]  # fmt: skip
        if s.optimizer == "bop":
            return [{"params": params, "optimizer": Bop, "threshold": s.threshold, "gamma": s.gamma, "lr": 1.0,
                     "schedule": True}]  # fmt: skip
        return [{"params": params, "optimizer": LatentAdam, "lr": s.lr, "clip": s.clip, "schedule": True}]

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> Tensor | None:
        return None

    @torch.no_grad()
    def step(self, step: int) -> None:
        changed = total = 0
        for name, layer in self.layers:
            now = self._sign(layer.weight)
            changed += int((now != self.signs[name]).sum())
            total += now.numel()
            self.signs[name] = now
        self.last = changed / max(total, 1)
        self.flips += self.last
        self.steps += 1

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        out = {"flip_ratio": self.flips / self.steps if self.steps else 0.0, "flip_ratio_last": self.last}
        self.flips, self.steps = 0.0, 0
        return out

    def report(self, rows: list[dict[str, Any]]) -> Any:
        from lowbit.figures import Section, figure, num

        pts = [(x, v) for r in rows if r.get("stage") == "qat"
               and (x := num(r.get("step"))) is not None and (v := num(r.get("flip_ratio"))) is not None]  # fmt: skip
        title = f"Binary weights ({self.settings.optimizer})"
        if not pts:
            return Section(title, '<p class="note">No QAT evaluation logged a flip ratio yet.</p>')
        fig = figure(6, 3.2)
        ax = fig.add_subplot()
        ax.plot([x for x, _ in pts], [max(v, 1e-9) for _, v in pts], marker="o")
        ax.set_yscale("log")
        ax.set_xlabel("QAT step")
        ax.set_ylabel("flip ratio per step (mean since last eval)")
        note = (f"<p>Share of binary weights that changed sign per optimizer step: {100 * pts[0][1]:.3f}% in the "
                f"first evaluation window, {100 * pts[-1][1]:.4f}% in the last.</p>")  # fmt: skip
        return Section(title, note, [("flip_ratio", "binary weights flipped per step", fig)])

    def state_dict(self) -> dict[str, Any]:
        return {"signs": dict(self.signs), "flips": self.flips, "steps": self.steps, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def bad(key: str, value: Any, allowed: str) -> FormatError:
            return FormatError(f"binary state: {key}={str(value)[:80]!r} is not allowed: {allowed}")

        if not isinstance(state, dict) or set(state) != {"signs", "flips", "steps", "last"}:
            raise bad("keys", list(state) if isinstance(state, dict) else state, "signs, flips, steps, last")
        signs = state["signs"]
        if not isinstance(signs, dict) or set(signs) != set(self.signs):
            raise bad("signs", list(signs) if isinstance(signs, dict) else signs, "one entry per binary layer")
        for name, t in signs.items():
            ok = isinstance(t, Tensor) and t.dtype == torch.int8 and t.shape == self.signs[name].shape
            if not ok or not bool(((t == 1) | (t == -1)).all()):
                raise bad(f"signs.{name}", getattr(t, "shape", t), "an int8 tensor of ±1 shaped like the weight")
        for key in ("flips", "last"):
            v = state[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < float("inf"):
                raise bad(key, v, "a finite number >= 0")
        if isinstance(state["steps"], bool) or not isinstance(state["steps"], int) or state["steps"] < 0:
            raise bad("steps", state["steps"], "an integer >= 0")
        self.signs = {n: t.clone() for n, t in signs.items()}
        self.flips, self.steps, self.last = float(state["flips"]), state["steps"], float(state["last"])
