"""Shared test set-up: one torch thread per pytest-xdist worker (two workers share two cores)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

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
