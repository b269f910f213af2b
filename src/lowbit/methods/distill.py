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

A causal LM's loss never holds its whole logits (``lowbit.tasks.text``: 49k-token vocabularies); it hands
the method the final hidden states of the scored positions and the head instead, and the KL is summed a
chunk of positions at a time (``chunked_distill_loss``), equal to the whole-logits KL (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.errors import ConfigError

__all__ = ["Distill", "DistillSettings", "chunked_distill_loss", "distill_loss"]


def distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · mean over samples of KL(softmax(teacher/T) ‖ softmax(student/T))``; logits (N, C)."""
    t = temperature
    log_p_student = torch.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = torch.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (N,)
    return kl.mean() * t * t


def _is_head_inputs(x: Any) -> bool:
    return all(hasattr(x, a) for a in ("ids", "hidden", "head", "chunk_tokens"))


def _chunk_kl_sum(head: nn.Module, hidden: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    return distill_loss(head(hidden), teacher_logits, temperature) * hidden.shape[0]


def chunked_distill_loss(outputs: Any, teacher: nn.Module, temperature: float) -> Tensor:
    """``distill_loss`` over a causal LM's scored positions without holding either model's whole logits:
    the teacher's final hidden states once (no gradient), then per chunk of positions both heads, the
    student's recomputed in the backward pass (``lowbit.tasks.text.HeadInputs``)."""
    from torch.utils.checkpoint import checkpoint

    hidden, chunk = outputs.hidden, outputs.chunk_tokens
    with torch.no_grad():
        t_hidden = teacher.model(outputs.ids).last_hidden_state[:, :-1].reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        with torch.no_grad():
            t_logits = teacher.lm_head(t_hidden[start : start + chunk])
        part = (outputs.head, hidden[start : start + chunk], t_logits, temperature)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_kl_sum, *part, use_reentrant=False)
        else:
            total = total + _chunk_kl_sum(*part)
    return total / hidden.shape[0]


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
        if _is_head_inputs(outputs):  # a causal LM's chunked loss: the logits are made a chunk at a time
            out = self.settings.weight * chunked_distill_loss(outputs, self.teacher, self.settings.temperature)
            self.last = float(out.detach())
            return out
        if not isinstance(outputs, Tensor):
            raise ConfigError("distill needs the model's outputs (logits, or a causal LM's final hidden states and "
                              f"head); this task gave {type(outputs).__name__}")  # fmt: skip
        inputs = batch[0] if isinstance(batch, tuple | list) else batch
        with torch.no_grad():
            target = self.teacher(inputs)
            target = target.logits if hasattr(target, "logits") else target
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
