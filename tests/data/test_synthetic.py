"""The synthetic dataset: deterministic, no files, shaped like Fashion-MNIST, balanced and learnable."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.data import DATASETS, VisionData, iterate_batches, load_dataset, vision
from lowbit.data.synthetic import SYNTHETIC_TEST, SYNTHETIC_TRAIN, load_synthetic, prototypes
from lowbit.errors import ConfigError


@pytest.fixture(scope="module")
def data() -> VisionData:
    return load_synthetic()


def _tensors(d: VisionData) -> tuple[torch.Tensor, ...]:
    return d.train_x, d.train_y, d.test_x, d.test_y


def test_registered_and_needs_no_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert DATASETS["synthetic"] is load_synthetic
    monkeypatch.setattr(vision, "SYSTEM_DATA_DIR", tmp_path / "nothing")
    monkeypatch.setenv(vision.DATA_ENV, str(tmp_path / "nothing"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    d = load_dataset("synthetic", split_seed=3)
    assert d.name == "synthetic"
    assert all(torch.equal(a, b) for a, b in zip(_tensors(d), _tensors(load_synthetic(3)), strict=True))
    assert not any(tmp_path.iterdir())  # nothing written either


def test_shapes_dtypes_and_labels(data: VisionData) -> None:
    assert data.train_x.shape == (SYNTHETIC_TRAIN, 1, 28, 28) and data.test_x.shape == (SYNTHETIC_TEST, 1, 28, 28)
    assert data.train_x.dtype == data.test_x.dtype == torch.float32
    assert data.train_y.dtype == data.test_y.dtype == torch.int64
    assert data.num_classes == 10 and data.input_shape == (1, 28, 28)
    for y in (data.train_y, data.test_y):
        assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.isfinite(data.train_x).all() and torch.isfinite(data.test_x).all()


def test_normalised_like_the_real_datasets(data: VisionData) -> None:
    """x = (p/255 - mean) / std for uint8 p, mean/std in the [0, 1] scale taken over the training pixels."""
    assert 0.0 < data.mean < 1.0 and 0.0 < data.std < 1.0
    assert abs(data.train_x.mean().item()) < 1e-4 and data.train_x.std().item() == pytest.approx(1.0, abs=1e-4)
    for x in (data.train_x, data.test_x):
        p = (x.double() * data.std + data.mean) * 255
        assert torch.allclose(p, p.round(), atol=1e-3)  # whole pixel levels
        assert p.min().item() > -0.5 and p.max().item() < 255.5
    p = (data.train_x.double() * data.std + data.mean) * 255
    assert p.round().unique().numel() > 200  # noise spreads the pixels over the levels


def test_classes_are_balanced_and_shuffled(data: VisionData) -> None:
    assert data.train_y.bincount().tolist() == [SYNTHETIC_TRAIN // 10] * 10
    assert data.test_y.bincount().tolist() == [SYNTHETIC_TEST // 10] * 10
    assert data.train_y[:200].bincount(minlength=10).min() > 5  # a prefix (train_subset) holds every class


def test_deterministic_per_split_seed(data: VisionData) -> None:
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    again, other = load_synthetic(0), load_synthetic(1)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global RNGs are left alone
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))
    for a, b in zip(_tensors(data), _tensors(again), strict=True):
        assert torch.equal(a, b)
    assert (data.mean, data.std) == (again.mean, again.std)
    for a, b in zip(_tensors(data), _tensors(other), strict=True):
        assert not torch.equal(a, b)
    # another split seed draws other images of the same ten classes: each class's mean image is
    # closest to the same class's mean image under seed 0
    means = [torch.stack([d.train_x[d.train_y == c].mean(0).flatten() for c in range(10)]) for d in (data, other)]
    similarity = torch.corrcoef(torch.cat(means))[:10, 10:]
    assert torch.equal(similarity.argmax(1), torch.arange(10)) and similarity.diagonal().min() > 0.95
    assert other.mean == pytest.approx(data.mean, abs=0.01)
    assert np.array_equal(prototypes(), prototypes())


def test_split_seed_is_checked() -> None:
    with pytest.raises(ConfigError, match="split_seed"):
        load_synthetic(-1)


def test_fast() -> None:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        load_synthetic()
        times.append(time.perf_counter() - t)
    assert min(times) < 1.0, times  # about 0.1 s on one core; generous for a busy machine


def _fit(model: nn.Module, data: VisionData, n: int, epochs: int, lr: float) -> float:
    """Train with SGD on the first n training images; test accuracy in %."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for epoch in range(epochs):
        model.train()
        for xb, yb in iterate_batches(data.train_x[:n], data.train_y[:n], 64, True, 0, epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(data.test_x).argmax(1) == data.test_y).double().mean().item() * 100


def test_learnable_but_not_trivial(data: VisionData) -> None:
    """Logistic regression from zero weights (no RNG at all) clears chance (10 %) by far, yet stays short of 100 %."""
    linear = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    nn.init.zeros_(linear[1].weight)
    nn.init.zeros_(linear[1].bias)
    acc = _fit(linear, data, n=2000, epochs=3, lr=0.01)
    assert 60.0 < acc < 97.0, acc
    # a small MLP after a single epoch of 2,000 images: clearly learnt, still well short of perfect
    gen = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / p.shape[-1] ** 0.5)
    acc = _fit(mlp, data, n=2000, epochs=1, lr=0.05)
    assert 60.0 < acc < 97.0, acc
