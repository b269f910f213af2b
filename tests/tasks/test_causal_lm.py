"""lowbit.tasks.text: the chunked causal-LM loss, and LR-QAT training under block checkpointing, on tiny random
LLaMA configs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec, Rule
from lowbit.llm.models import byte_tokenizer, enable_block_checkpointing
from lowbit.tasks.text import causal_lm_loss

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(chunk: int, tiny_llama: Callable[..., nn.Module]) -> None:
    """Chunks that do not divide B·(T−1) = 3·10 included: same value and gradients as the full logits."""
    model = tiny_llama(vocab_size=97, tie_word_embeddings=True)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    ref = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = causal_lm_loss(model, ids, chunk_tokens=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_loss_of_a_model_without_a_separate_head_is_the_plain_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 20))
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 20), ids[:, 1:].reshape(-1))
    assert torch.equal(causal_lm_loss(model, ids), ref)


def test_lrqat_training_with_block_checkpointing_lowers_the_loss_and_moves_only_adapters(
    tiny_llama: Callable[..., nn.Module],
) -> None:
    """Decoder-block gradient checkpointing on top of the per-layer one: it trains, and only A, B, s change."""
    model = tiny_llama(vocab_size=97, tie_word_embeddings=True)
    spec = QuantSpec(bits=3, granularity="group", group_size=16, init="lp")
    config = QuantConfig(
        weight=spec, act=None, lowrank=LowRankSpec(rank=4), rules=(Rule("lm_head", skip=True),), freeze_unquantized=True
    )
    lowbit.prepare(model, config)
    assert enable_block_checkpointing(model)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if not n.endswith(("lora_a", "lora_b", "scale"))}
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 14 * 3
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = causal_lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1, losses
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), f"{n} changed"


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = byte_tokenizer()
    text = "Thou art — naïve 😀\nline two\t end"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
