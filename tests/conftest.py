"""Shared test set-up: one torch thread per pytest-xdist worker (two workers share two cores)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lowbit import methods as methods_mod

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., nn.Module]:
    """A factory of small random Hugging Face LLaMAs (no download); keyword arguments override the config."""
    transformers = pytest.importorskip("transformers")

    def build(seed: int = 0, **overrides: Any) -> nn.Module:
        config = {
            "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **overrides,
        }  # fmt: skip
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))

    return build


@dataclass(frozen=True)
class InterruptSettings:
    at: int
    marker: str
    hard: bool = False


class Interrupt:
    """A test method that interrupts training once at step ``at`` (like Ctrl-C, or kill -9 with ``hard``).

    ``marker`` is a file created when it fires, so the resumed run passes that step.
    """

    Settings = InterruptSettings

    def __init__(self, total_steps: int, at: int, marker: str, hard: bool = False) -> None:
        self.at, self.hard, self.marker = at, hard, Path(marker)

    def attach(self, model: nn.Module) -> None:
        pass

    def loss(self, model: nn.Module, batch: Any = None, outputs: Any = None) -> None:
        return None

    def step(self, step: int) -> None:
        if step == self.at and not self.marker.exists():
            self.marker.touch()
            if self.hard:
                os.kill(os.getpid(), signal.SIGKILL)
            raise KeyboardInterrupt

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@pytest.fixture
def interrupt_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers ``Interrupt`` as the method ``interrupt`` for one test."""
    monkeypatch.setitem(methods_mod.METHODS, "interrupt", Interrupt)
