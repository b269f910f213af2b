"""The ``llm`` section of a recipe: weight-only QAT of a causal language model (``lowbit.llm_train``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lowbit.validate import check as _check
from lowbit.validate import is_int as _is_int
from lowbit.validate import require_int

__all__ = ["LLMConfig", "LLM_METHODS", "LLM_TARGETS"]

LLM_METHODS = ("lrqat", "scales_only", "full_qat", "rtn")
LLM_TARGETS = ("*q_proj", "*k_proj", "*v_proj", "*o_proj", "*gate_proj", "*up_proj", "*down_proj")


@dataclass(frozen=True)
class LLMConfig:
    """Weight-only QAT of a causal language model (``lowbit.llm_train``); set as a recipe's ``llm`` section.

    ``model``: ``smollm2`` (offline SmolLM2-135M-Instruct), ``random-llama`` (a random LLaMA built from
    ``model_args`` with a byte-level tokenizer: smoke runs and tests), or a local Hugging Face folder.
    ``corpus`` / ``other_corpus``: ``shakespeare``, ``kjv`` or ``file:PATH`` (UTF-8 text); the corpus's
    last ``heldout_fraction`` is held out for perplexity, the other corpus is scored as a whole.
    """

    model: str = "smollm2"
    model_args: dict[str, Any] = field(default_factory=dict)
    corpus: str = "shakespeare"
    other_corpus: str | None = "kjv"
    heldout_fraction: float = 0.1
    method: str = "lrqat"
    bits: int = 4
    granularity: str = "channel"
    group_size: int | None = None
    rank: int = 32
    alpha: float = 1.0
    phi: str = "fixed_point8"
    init: str = "lp"
    targets: tuple[str, ...] = LLM_TARGETS
    steps: int = 100
    batch_size: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    scale_lr: float = 1e-5
    warmup: float = 0.1
    block_checkpoint: bool = True
    eval_every: int = 0
    eval_windows: int = 16
    eval_window: int = 512
    checkpoint_every: int = 25
    device: str = "cpu"

    def __post_init__(self) -> None:
        _check(self.method in LLM_METHODS, "method", self.method, f"one of {LLM_METHODS}")
        _check(self.granularity in ("channel", "group"), "granularity", self.granularity, "channel or group")
        _check(_is_int(self.bits) and 2 <= self.bits <= 8, "bits", self.bits, "an integer from 2 to 8")
        for n, lo in (
            ("rank", 0),
            ("steps", 0),
            ("batch_size", 1),
            ("seq_len", 2),
            ("eval_every", 0),
            ("eval_windows", 1),
            ("eval_window", 2),
            ("checkpoint_every", 0),
        ):
            require_int("llm", n, getattr(self, n), lo)
        if self.granularity == "group":
            _check(
                _is_int(self.group_size) and self.group_size > 0,
                "group_size",
                self.group_size,
                "a positive integer with granularity: group",
            )
        for n in ("lr", "scale_lr", "alpha"):
            _check(
                isinstance(getattr(self, n), int | float) and getattr(self, n) >= 0,
                n,
                getattr(self, n),
                "a number >= 0",
            )
        _check(0 < self.heldout_fraction < 1, "heldout_fraction", self.heldout_fraction, "a number in (0, 1)")
        _check(0 <= self.warmup < 1, "warmup", self.warmup, "a fraction in [0, 1)")
        _check(bool(self.targets), "targets", self.targets, "a non-empty list of module-name globs")
