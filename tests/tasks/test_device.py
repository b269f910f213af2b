"""A recipe's ``device``: a GPU that is not there is a ConfigError at once (never a silent CPU run); a
finished run's task is rebuilt on the CPU, where ``lowbit.load`` puts its integer model."""

from __future__ import annotations

import pytest
import torch

from lowbit.config import recipe_from_dict
from lowbit.distributed import torch_device
from lowbit.errors import ConfigError
from lowbit.tasks.vision import VisionTask, evaluate_classifier

RECIPE = {"data": {"name": "synthetic", "train_subset": 64, "test_subset": 32, "batch_size": 16},
          "model": {"name": "mlp", "args": {"width": 16, "depth": 1}}}  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_missing_gpu_is_refused_by_name(device: str) -> None:
    with pytest.raises(ConfigError, match=f"device='{device}': this torch has no CUDA device"):
        VisionTask(recipe_from_dict({**RECIPE, "device": device}))
    with pytest.raises(ConfigError, match="no CUDA device"):
        torch_device(device)


def test_cpu_task_keeps_data_model_and_batches_on_the_cpu(tmp_path) -> None:  # noqa: ANN001
    task = VisionTask(recipe_from_dict(RECIPE))
    assert torch_device("cpu") == torch.device("cpu") == task.device
    xb, yb = next(task.batches(0))
    assert xb.device.type == yb.device.type == "cpu" and xb.shape[0] == 16
    assert all(p.device.type == "cpu" for p in task.new_model().parameters())
    assert task.sample_input().device.type == "cpu"


def test_for_run_is_on_the_cpu_whatever_the_run_trained_on(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    seen = []
    monkeypatch.setattr(VisionTask, "__init__", lambda self, recipe: seen.append(recipe.device))
    VisionTask.for_run(recipe_from_dict({**RECIPE, "device": "cuda:1"}), tmp_path)
    assert seen == ["cpu"]


def test_evaluation_moves_batches_to_the_model_and_counts_exactly() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x, y = torch.randn(10, 1, 2, 2), torch.randint(0, 3, (10,))
    got = evaluate_classifier(model, x, y, batch_size=3)
    with torch.no_grad():
        out = model(x)
    assert got["accuracy"] == 100.0 * int((out.argmax(1) == y).sum()) / 10
    assert got["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)), rel=1e-6)
