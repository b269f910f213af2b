"""Distillation from the float model (Hinton et al. 2015), for every run: the student is the model in QAT.

The loss added to the task's, per batch of ``N`` samples with teacher logits ``t`` and student logits
``s`` (the model's outputs), temperature ``T`` and ``weight``::

    L_distill = weight · T² · (1/N) Σ_n KL( softmax(t_n / T) ‖ softmax(s_n / T) )

``T²`` keeps the gradient's size independent of ``T`` (the soft targets' gradients scale as ``1/T²``).
With ``T = 1`` and a large ``weight`` it is ReActNet's distribution loss (the KL to the teacher's
distribution); the binary-network papers train with it, and QAT at 3 and 4 bits gains from it too.

The teacher is the run's float model, loaded again from the run's cache through the loop's
``use_float_model`` hook (``lowbit.methods``), frozen (no gradients, eval mode) and not part of the
method's state: checkpoints stay the student's, and a resumed run loads the same teacher again. The
teacher sees the same inputs as the student: ``batch[0]`` of an ``(inputs, targets)`` batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError

__all__ = ["Distill", "DistillSettings", "distill_loss"]


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · mean over samples of KL(softmax(teacher/T) ‖ softmax(student/T))``; logits (N, C)."""
    t = temperature
    log_p_student = torch.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (N,)
    return kl.mean() * t * t


@dataclass(frozen=True)
class DistillSettings:
    """``distill``: ``weight`` of the distillation loss (added to the task's), ``temperature`` T."""

    weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in ("weight", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1e6:
                raise ConfigError(f"{name}={v!r} is not allowed: use a number in (0, 1e6)")


class Distill:
    """The KL divergence to the frozen float model's outputs, added to the task loss."""

    Settings = DistillSettings

    def __init__(self, total_steps: int, weight: float = 1.0, temperature: float = 1.0) -> None:
        self.settings = DistillSettings(weight, temperature)
        self.teacher: nn.Module | None = None
        self.last = 0.0  # the last batch's distillation loss, for the metrics rows

    def attach(self, model: nn.Module) -> None:
        pass

    def use_float_model(self, load: Callable[[], nn.Module]) -> None:
        teacher = load()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()

    def loss(self, model: nn.Module, batch: Any, outputs: Any) -> Tensor | None:
        if self.teacher is None:
            raise ConfigError("distill: no teacher: the loop gives it through use_float_model(load) before training")
        if not isinstance(outputs, Tensor):
            raise ConfigError(
                "distill needs the model's outputs (logits), and this task does not build them whole "
                "(the causal-LM task computes its loss in chunks): use distill with classification recipes"
            )
        inputs = batch[0] if isinstance(batch, tuple | list) else batch
        with torch.no_grad():
            target = self.teacher(inputs)
        if target.shape != outputs.shape:
            raise ConfigError(f"distill: the teacher's outputs {tuple(target.shape)} and the model's "
                              f"{tuple(outputs.shape)} differ: it needs the run's own float model")  # fmt: skip
        out = self.settings.weight * distill_loss(outputs, target, self.settings.temperature)
        self.last = float(out.detach())
        return out

    def step(self, step: int) -> None:
        pass

    def metrics(self, model: nn.Module) -> dict[str, Any]:
        return {"distill_loss": self.last}

    def state_dict(self) -> dict[str, Any]:
        return {}  # the teacher is the run's float model: loaded again, never saved with the student

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
