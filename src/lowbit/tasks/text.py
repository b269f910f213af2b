"""Causal language modelling: a pretrained decoder on a text corpus; metric: perplexity.

The training corpus (``data.name``: ``shakespeare``, ``kjv`` or ``file:PATH``) is tokenized once
(cached), its last ``text.heldout_fraction`` held out, the rest cut into blocks of ``text.seq_len``
tokens. Step ``t`` trains on the ``data.batch_size`` blocks at positions ``t·B .. t·B + B − 1`` of a
fixed shuffle (by seed), read cyclically, so a resumed run sees exactly the batches an uninterrupted
one would. Evaluation: sliding-window perplexity on the held-out part (``test_perplexity``, and its log
``test_loss``) and on ``text.other_corpus`` (``other_perplexity``), ``text.eval_windows`` windows of
``text.eval_window`` tokens each.

The loss (``causal_lm_loss``) is next-token cross-entropy; for models with a separate head it runs the
head on ``chunk_tokens`` positions at a time and recomputes them in the backward pass, so the
(B·T × vocab) logits are never held whole.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lowbit import distributed
from lowbit.config import Recipe
from lowbit.errors import ConfigError

__all__ = ["TextTask", "HeadInputs", "causal_lm_loss", "causal_lm_loss_and_outputs", "logits_of", "load_text"]


def load_text(spec: str, field: str) -> str:
    """A corpus by name (``shakespeare``, ``kjv``) or ``file:PATH``; ``field`` names it in errors."""
    from lowbit.data.text import CORPORA, load_corpus

    if spec.startswith("file:"):
        path = Path(spec[5:]).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{field}={spec!r}: cannot read {str(path)!r} as UTF-8 text ({e})") from None
    if spec not in CORPORA:
        raise ConfigError(f"{field}={spec!r}: allowed {', '.join(sorted(CORPORA))} or file:PATH")
    return load_corpus(spec)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


@dataclass(frozen=True)
class HeadInputs:
    """What the chunked causal-LM loss leaves for methods that need the logits (distillation) without
    ever holding them whole: ``ids`` (B, T), the final hidden states of the positions it scored (the first
    T - 1 of each row, flattened to (B·(T-1), D)) and the head that turns them into logits."""

    ids: torch.Tensor
    hidden: torch.Tensor
    head: nn.Module
    chunk_tokens: int


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (B, T), without holding the whole (B·T × vocab) logits.

    For models with a decoder (``model.model``) and an ``lm_head`` (the Hugging Face causal LMs), the
    head and the loss run on ``chunk_tokens`` positions at a time and are recomputed in the backward
    pass: a 49k vocabulary at 8 × 512 tokens would otherwise hold about 2.4 GB of logits, softmax and
    their gradient (0.6 GB at 1 × 512), more than all of LR-QAT's other training memory of a 135M
    model. Other models fall back to the plain loss on the full logits; the two agree to float
    rounding (tested).
    """
    return causal_lm_loss_and_outputs(model, ids, chunk_tokens)[0]


def causal_lm_loss_and_outputs(
    model: nn.Module, ids: torch.Tensor, chunk_tokens: int = 256
) -> tuple[torch.Tensor, torch.Tensor | HeadInputs]:
    """``causal_lm_loss`` and what it computed: the whole logits (models without a separate head, or
    sharded by FSDP), or ``HeadInputs`` (the chunked path)."""
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    targets = ids[:, 1:].reshape(-1)
    # a model sharded by FSDP gathers its embeddings and head only when called as a whole
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module) or distributed.is_sharded(model):
        logits = logits_of(model, ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)
        return loss, logits
    hidden = decoder(ids).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = (head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss_sum, *part, use_reentrant=False)
        else:
            total = total + _head_loss_sum(*part)
    return total / targets.numel(), HeadInputs(ids, hidden, head, chunk_tokens)


class TextTask:
    """Next-token prediction on ``recipe.data.name`` by the causal LM ``recipe.model``."""

    metric_name = "perplexity"

    def __init__(self, recipe: Recipe, tokenizer: Any = None) -> None:
        from lowbit.data.text import split_tokens, token_blocks, tokenize_corpus
        from lowbit.llm.models import load_causal_lm

        cfg = recipe.text
        assert cfg is not None  # Recipe fills the default for task: causal_lm
        self.recipe, self.cfg = recipe, cfg
        self.dataset = recipe.data.name
        self.device = distributed.torch_device(recipe.device)
        text = load_text(recipe.data.name, "data.name")
        self.model: nn.Module | None = None
        if tokenizer is None:
            self.model, tokenizer = load_causal_lm(recipe.model.name, recipe.model.args, recipe.seed)
        self.tokenizer = tokenizer
        train_ids, self.held = split_tokens(tokenize_corpus(text, self.tokenizer), cfg.heldout_fraction)
        other = cfg.other_corpus
        self.other = tokenize_corpus(load_text(other, "text.other_corpus"), self.tokenizer) if other else None
        if len(train_ids) < cfg.seq_len + 1:
            raise ConfigError(
                f"text.seq_len={cfg.seq_len}: the training part of {recipe.data.name!r} has only "
                f"{len(train_ids)} tokens"
            )
        self.blocks = token_blocks(train_ids, cfg.seq_len)
        self.batch_size = recipe.data.batch_size
        self.steps_per_epoch = max(1, self.blocks.shape[0] // self.batch_size)
        self.order = torch.randperm(self.blocks.shape[0], generator=torch.Generator().manual_seed(recipe.seed))

    @classmethod
    def for_run(cls, recipe: Recipe, run_dir: Path) -> TextTask:
        """The task of a finished run, with the tokenizer the run saved (the float model is not loaded), on
        the CPU where ``lowbit.load`` puts the run's integer model."""
        from transformers import AutoTokenizer

        folder = run_dir / "tokenizer"
        if not folder.is_dir():
            raise ConfigError(f"run {str(run_dir)!r} has no tokenizer/ folder: finish it with `lowbit train --resume`")
        return cls(dataclasses.replace(recipe, device="cpu"), AutoTokenizer.from_pretrained(folder))

    def float_model(self, run_dir: Path, resume: bool, progress: bool) -> nn.Module:
        """The pretrained model: the one loaded with the tokenizer the first time, a fresh copy after that
        (a teacher, or rank 0's whole copy of a sharded model, must not be the model in training)."""
        model, self.model = self.model, None
        if model is None:
            from lowbit.llm.models import load_causal_lm

            model, _ = load_causal_lm(self.recipe.model.name, self.recipe.model.args, self.recipe.seed)
        return model.to(self.device)

    def batch(self, step: int) -> torch.Tensor:
        """The ``batch_size`` blocks of step ``step`` (B, seq_len)."""
        idx = self.order[(step * self.batch_size + torch.arange(self.batch_size)) % self.blocks.shape[0]]
        return self.blocks[idx].to(self.device)

    def batches(self, step: int) -> Iterator[torch.Tensor]:
        while True:
            yield self.batch(step)
            step += 1

    def loss(self, model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return causal_lm_loss_and_outputs(model, batch)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from lowbit.data.text import sliding_window_perplexity

        cfg = self.cfg
        kw = {"window": min(cfg.eval_window, len(self.held)), "max_windows": cfg.eval_windows, "batch_size": 4}
        p = sliding_window_perplexity(model, self.held, **kw)
        row = {"test_perplexity": p, "test_loss": math.log(p)}
        if self.other is not None:
            row["other_perplexity"] = sliding_window_perplexity(model, self.other, **kw)
        return row

    def calib(self, n: int) -> list[torch.Tensor]:
        return [self.batch(i) for i in range(n)]

    def method_inputs(self, step: int) -> Iterator[torch.Tensor]:
        return self.batches(step)

    def sample_input(self) -> torch.Tensor:
        raise ConfigError(
            "ONNX export of causal language models is not supported: the run's integer model is "
            "model.safetensors (lowbit.load, `lowbit generate RUN`); GGUF export for llama.cpp is planned"
        )

    def after_prepare(self, model: nn.Module, training: bool) -> None:
        if training and self.cfg.block_checkpoint:
            from lowbit.llm.models import enable_block_checkpointing

            enable_block_checkpointing(model)

    def save_extras(self, run_dir: Path) -> dict[str, Any]:
        """The tokenizer beside the model (``lowbit generate RUN``); the other corpus's name."""
        self.tokenizer.save_pretrained(run_dir / "tokenizer")
        return {"other_corpus": self.cfg.other_corpus, "tokens_per_step": self.batch_size * self.cfg.seq_len}
