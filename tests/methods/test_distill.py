"""Distillation from the float model: the loss against torch's own KL, its gradient, and a run with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.config import recipe_from_dict
from lowbit.errors import ConfigError
from lowbit.methods import METHODS, build_methods
from lowbit.methods.distill import Distill, distill_loss
from lowbit.run import run

torch.set_num_threads(1)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_the_loss_is_t_squared_times_the_batch_mean_kl(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    ref = nn.functional.kl_div(torch.log_softmax(s / temperature, -1), torch.softmax(t / temperature, -1),
                               reduction="batchmean") * temperature**2  # fmt: skip
    torch.testing.assert_close(distill_loss(s, t, temperature), ref)
    assert float(distill_loss(t, t, temperature)) == pytest.approx(0.0, abs=1e-6)
    # the gradient w.r.t. the student's logits is (softmax(s/T) - softmax(t/T)) · T / N
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(distill_loss(s, t, temperature), s)
    want = (torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1)) * temperature / 6
    torch.testing.assert_close(grad, want.detach())


def test_settings_and_missing_outputs_are_config_errors() -> None:
    assert METHODS["distill"] is Distill
    with pytest.raises(ConfigError, match="temperature=0"):
        build_methods([{"name": "distill", "temperature": 0}], 1)
    m = Distill(1)
    m.use_float_model(lambda: nn.Linear(3, 2))
    assert not any(p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training
    with pytest.raises(ConfigError, match="outputs"):
        m.loss(nn.Linear(3, 2), torch.ones(1, 3), None)


TINY = {
    "name": "d",
    "data": {"name": "synthetic", "train_subset": 256, "test_subset": 128, "batch_size": 64},
    "model": {"name": "mlp", "args": {"width": 16, "depth": 1}},
    "pretrain": {"epochs": 1},
    "quant": {"weight": {"bits": 2}, "act": {"bits": 4}},
    "qat": {"epochs": 1},
}


def test_a_run_distils_from_its_own_float_model(tmp_path: Path) -> None:
    plain = run(recipe_from_dict(TINY), tmp_path / "plain", progress=False)
    with_kd = run(recipe_from_dict({**TINY, "methods": [{"name": "distill", "weight": 2.0}]}), tmp_path / "kd",
                  progress=False)  # fmt: skip
    assert with_kd["float_metric"] == plain["float_metric"]  # the same cached float model
    rows = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    qat = [r for r in rows if r["stage"] == "qat"]
    assert qat and all(r["distill_loss"] > 0 for r in qat)
    assert with_kd["quant_metric"] != plain["quant_metric"] or with_kd["qat_metric"] != plain["qat_metric"]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_a_causal_lms_chunked_kl_equals_the_whole_logits_kl_and_its_gradients(chunk: int) -> None:
    """Against the naive reference: both models' whole logits at the scored positions, ``distill_loss``."""
    transformers = pytest.importorskip("transformers")
    from lowbit.tasks.text import causal_lm_loss_and_outputs

    def llama(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg)

    student, teacher = llama(0), llama(1).eval()
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    m = Distill(1, weight=1.5, temperature=2.0)
    m.use_float_model(lambda: teacher)
    _, outputs = causal_lm_loss_and_outputs(student, ids, chunk_tokens=chunk)
    got = m.loss(student, ids, outputs)
    (g_got,) = torch.autograd.grad(got, student.model.layers[0].mlp.up_proj.weight)
    s_logits = student(ids).logits[:, :-1].reshape(-1, 50)
    with torch.no_grad():
        t_logits = teacher(ids).logits[:, :-1].reshape(-1, 50)
    want = 1.5 * distill_loss(s_logits, t_logits, 2.0)
    (g_want,) = torch.autograd.grad(want, student.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-8)
    assert m.metrics(student)["distill_loss"] == pytest.approx(float(want.detach()), rel=1e-5)
