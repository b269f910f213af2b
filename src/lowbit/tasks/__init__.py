"""Tasks: what the one training loop needs to know about a domain, and nothing more.

A task supplies the float model, batches, the loss and the evaluation; ``lowbit.train.train_stage``
and ``lowbit.run.run`` call it without knowing which task it is. ``TASKS`` maps a recipe's ``task`` to
its class (``classification``: images, ``lowbit.tasks.vision``; ``causal_lm``: a pretrained language
model on a text corpus, ``lowbit.tasks.text``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lowbit.tasks.text import TextTask
from lowbit.tasks.vision import VisionTask

__all__ = ["Task", "TASKS", "build_task"]


class Task(Protocol):
    metric_name: str  # "accuracy" (in %, higher is better) or "perplexity" (lower is better)
    dataset: str  # what summary.json names as the dataset
    steps_per_epoch: int

    def float_model(self, run_dir: Path, resume: bool, progress: bool) -> nn.Module: ...
    def batches(self, step: int) -> Iterator[Any]: ...  # training batches from ``step`` on, endlessly
    # (loss, model outputs); outputs are None where the task never builds them whole (the causal-LM
    # task's chunked loss never holds all the logits)
    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Any]: ...
    def evaluate(self, model: nn.Module) -> dict[str, float]: ...  # "test_<metric_name>", "test_loss", ...
    def calib(self, n: int) -> list[Any]: ...  # n batches of model inputs (activation ranges)
    def method_inputs(self, step: int) -> Iterator[Any]: ...  # inputs for methods' hooks (BN re-estimation)
    def after_prepare(self, model: nn.Module, training: bool) -> None: ...
    def save_extras(self, run_dir: Path) -> dict[str, Any]: ...  # files beside the model; summary fields


def build_task(recipe: Any) -> Task:
    """The task a recipe names (``recipe.task``), with its data loaded."""
    return TASKS[recipe.task](recipe)

TASKS: dict[str, Any] = {"classification": VisionTask, "causal_lm": TextTask}
