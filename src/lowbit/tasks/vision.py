"""Image classification: a model from ``lowbit.models`` on a dataset from ``lowbit.data``.

The float model is pre-trained by the same loop (stage ``pretrain``) and cached under
``<runs root>/.cache/`` by a hash of everything that determines it (data, model, pre-training stage,
seed), so QAT at other bit widths reuses it. Batches come in an order fixed by (seed, epoch), so a
resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit import distributed
from lowbit.checkpoint import load_checkpoint, save_checkpoint
from lowbit.config import Recipe, recipe_to_dict, stage_hash
from lowbit.data import load_dataset
from lowbit.data.vision import VisionData, iterate_batches, num_batches
from lowbit.errors import ConfigError, FormatError
from lowbit.models import build_model

__all__ = ["VisionTask", "evaluate_classifier", "subset_data", "data_identity"]

log = logging.getLogger(__name__)
_TENSORS = ("train_x", "train_y", "test_x", "test_y")


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """Accuracy (%) and mean cross-entropy of ``model`` on ``(x, y)`` in eval mode."""
    was = model.training
    model.eval()
    dev = next(itertools.chain(model.parameters(), model.buffers()), x).device
    correct, loss_sum = 0, 0.0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size].to(dev))
        yb = y[i : i + batch_size].to(dev)
        loss_sum += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was)
    n = max(x.shape[0], 1)
    return {"accuracy": 100.0 * correct / n, "loss": loss_sum / n}


def subset_data(data: VisionData, recipe: Recipe) -> VisionData:
    d = recipe.data
    if d.train_subset is None and d.test_subset is None:
        return data
    ntr = d.train_subset or data.train_x.shape[0]
    nte = d.test_subset or data.test_x.shape[0]
    return VisionData(
        name=data.name,
        train_x=data.train_x[:ntr],
        train_y=data.train_y[:ntr],
        test_x=data.test_x[:nte],
        test_y=data.test_y[:nte],
        num_classes=data.num_classes,
        mean=data.mean,
        std=data.std,
    )


def data_identity(data: VisionData) -> str:
    """A cheap digest of what was actually loaded (sizes, every label, 64 evenly spaced images per split),
    so a float model cached for one dataset is never reused for another with the same recipe."""
    h = hashlib.sha256(f"{data.name}|{data.num_classes}|{data.mean!r}|{data.std!r}".encode())
    for x, y in ((data.train_x, data.train_y), (data.test_x, data.test_y)):
        h.update(f"{tuple(x.shape)}".encode())
        h.update(y.numpy().tobytes())
        idx = torch.linspace(0, x.shape[0] - 1, min(64, x.shape[0])).long() if x.shape[0] else torch.zeros(0).long()
        h.update(x[idx].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class VisionTask:
    """Classification of ``recipe.data`` by ``recipe.model``; metric: test accuracy in %."""

    metric_name = "accuracy"

    def __init__(self, recipe: Recipe) -> None:
        if recipe.text is not None:
            raise ConfigError("text: this section is for task: causal_lm; remove it or set task: causal_lm")
        self.device = distributed.torch_device(recipe.device)
        self.recipe = recipe
        data = subset_data(load_dataset(recipe.data.name, recipe.data.split_seed), recipe)
        self.identity = data_identity(data)
        # the whole dataset lives on the run's device (Fashion-MNIST is 220 MB as float32): batches are
        # gathered there, with no host-to-device copy per step
        self.data = dataclasses.replace(data, **{k: getattr(data, k).to(self.device) for k in _TENSORS})
        self.dataset = self.data.name
        self.batch_size = recipe.data.batch_size
        self.steps_per_epoch = num_batches(self.data.train_x.shape[0], self.batch_size)

    @classmethod
    def for_run(cls, recipe: Recipe, run_dir: Path) -> VisionTask:
        """The task of a finished run (``lowbit eval`` / ``export``), on the CPU: a finished run's integer
        model is loaded there, also when the run trained on a GPU."""
        return cls(dataclasses.replace(recipe, device="cpu"))

    def new_model(self) -> nn.Module:
        r = self.recipe
        return build_model(r.model.name, num_classes=self.data.num_classes, **r.model.args).to(self.device)

    def float_model(self, run_dir: Path, resume: bool, progress: bool) -> nn.Module:
        """The pre-trained float model: from the cache, or trained now by the ``pretrain`` stage (and cached)."""
        from lowbit.train import Stage, train_stage

        r = self.recipe
        torch.manual_seed(r.seed)
        model = self.new_model()
        key = stage_hash(r.data, r.model, r.pretrain, r.seed, self.identity)
        cache = run_dir.parent / ".cache" / f"float-{r.model.name}-{key}.safetensors"
        if distributed.agree(cache.exists()):  # under torchrun every rank takes the same branch
            try:
                model.load_state_dict(load_checkpoint(cache)["model"])
                loaded = True
            except (FormatError, RuntimeError) as e:
                log.warning("float cache %s is unusable (%s); training again", cache, e)
                loaded = False
            if distributed.agree(loaded):
                log.info("float model from cache %s", cache)
                return model
            torch.manual_seed(r.seed)
            model = self.new_model()
        if r.pretrain.epochs > 0 or r.pretrain.steps:
            resolved = json.loads(json.dumps(recipe_to_dict(r)))
            stage = Stage("pretrain", r.pretrain, run_dir, r.seed, r.checkpoint_every, progress, (), resolved)
            with torch.random.fork_rng():  # the float stage leaves the global RNG as a cache hit would
                train_stage(model, self, stage, resume=resume)
        if distributed.is_main():
            save_checkpoint(cache, {"model": model.state_dict()})
        distributed.barrier()
        return model

    def batches(self, step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d, bpe = self.data, self.steps_per_epoch
        epoch, start = divmod(step, bpe)
        while True:
            yield from iterate_batches(
                d.train_x, d.train_y, self.batch_size, True, self.recipe.seed, epoch, start_batch=start
            )
            epoch, start = epoch + 1, 0

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        out = model(batch[0])
        return nn.functional.cross_entropy(out, batch[1]), out

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        m = evaluate_classifier(model, self.data.test_x, self.data.test_y, self.recipe.data.eval_batch_size)
        return {f"test_{k}": v for k, v in m.items()}

    def calib(self, n: int) -> list[torch.Tensor]:
        d = self.data
        it = iterate_batches(d.train_x, d.train_y, self.batch_size, True, self.recipe.seed + 1, 0)
        return [xb for _, (xb, _) in zip(range(n), it, strict=False)]

    def method_inputs(self, step: int) -> Iterator[torch.Tensor]:
        """Training inputs for methods' hooks (batch-norm re-estimation), a fixed order per (seed, step)."""
        d = self.data
        for xb, _ in iterate_batches(d.train_x, d.train_y, self.batch_size, True, self.recipe.seed + 2, step):
            yield xb

    def sample_input(self) -> torch.Tensor:
        return self.data.test_x[:1].cpu()

    def after_prepare(self, model: nn.Module, training: bool) -> None:
        pass

    def save_extras(self, run_dir: Path) -> dict[str, Any]:
        return {}
