"""Tests for lowbit.models: every registered model builds, runs forward and backward, and rejects bad
arguments with a ConfigError that names the argument."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.models import MODELS, build_model, model_arguments
from lowbit.models.mobilenet import make_divisible


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    out = model(x)
    assert out.shape == (6, 10) and out.dtype == torch.float32
    nn.functional.cross_entropy(out, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() > 1)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)  # batch of one in eval mode (BatchNorm uses running stats)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_num_classes_and_in_channels(name: str) -> None:
    model = build_model(name, num_classes=7, in_channels=3)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip_and_names(name: str) -> None:
    torch.manual_seed(1)
    a = build_model(name).eval()
    b = build_model(name).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(a(x), b(x))
    names = dict(a.named_modules())
    assert isinstance(names["classifier"], nn.Linear) and isinstance(names["features"], nn.Sequential)


def test_initial_loss_is_near_chance() -> None:
    # Small classifier init: logits start near zero, so the loss starts near ln(10).
    for name in MODELS:
        torch.manual_seed(0)
        out = build_model(name)(torch.randn(32, 1, 28, 28))
        loss = nn.functional.cross_entropy(out, torch.randint(0, 10, (32,)))
        assert abs(loss.item() - 2.3026) < 0.1, name


def test_parameter_counts() -> None:
    mobilenet = n_params(build_model("mobilenetv2"))
    assert 45_000 <= mobilenet <= 60_000, mobilenet
    assert 50_000 <= n_params(build_model("resnet")) <= 80_000
    assert n_params(build_model("mlp", depth=0)) == 784 * 10 + 10  # a linear classifier
    assert n_params(build_model("mlp", width=32, depth=1)) == 784 * 32 + 2 * 32 + 32 * 10 + 10
    assert (
        n_params(build_model("mobilenetv2", width_mult=0.5))
        < mobilenet
        < n_params(build_model("mobilenetv2", width_mult=2.0))
    )


def test_mobilenet_structure() -> None:
    model = build_model("mobilenetv2", width_mult=1.0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert all(c.out_channels % 8 == 0 for c in convs)
    assert isinstance(dict(model.named_modules())["features.0.0"], nn.Conv2d)
    residual = [m for m in model.features if getattr(m, "use_residual", False)]
    assert residual  # some blocks keep their shape and add their input
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())


def test_resnet_structure() -> None:
    model = build_model("resnet", width=8, blocks=[2, 1, 1])
    names = dict(model.named_modules())
    assert isinstance(names["features.0.0"], nn.Conv2d) and names["features.0.0"].out_channels == 8
    assert isinstance(names["features.1.1.shortcut"], nn.Identity)  # same shape: identity shortcut
    assert isinstance(names["features.2.0.shortcut"], nn.Sequential)  # stride 2, wider: 1×1 conv
    assert names["classifier"].in_features == 32


def test_make_divisible() -> None:
    assert [make_divisible(v) for v in (3, 8, 12, 13, 16 * 0.35, 96 * 1.4, 20)] == [8, 8, 16, 16, 8, 136, 24]
    for v in range(1, 500):
        r = make_divisible(v * 0.37)
        assert r % 8 == 0 and r >= 0.9 * v * 0.37


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ConfigError, match=r"'vgg'.*mlp.*mobilenetv2.*resnet"):
        build_model("vgg")


def test_unknown_keyword_names_it_and_lists_accepted() -> None:
    with pytest.raises(ConfigError, match=r"'widht'.*accepted: width, depth, num_classes, in_channels, image_size"):
        build_model("mlp", widht=64)
    assert model_arguments("mobilenetv2") == {
        "width_mult": 1.0,
        "expand_ratio": 6,
        "dropout": 0.0,
        "num_classes": 10,
        "in_channels": 1,
    }


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("mlp", {"width": 0}, "width=0"),
        ("mlp", {"depth": -1}, "depth=-1"),
        ("mlp", {"width": 2.5}, "width=2.5"),
        ("mlp", {"num_classes": True}, "num_classes=True"),
        ("mlp", {"image_size": "28"}, "image_size='28'"),
        ("resnet", {"width": 0}, "width=0"),
        ("resnet", {"blocks": ()}, "blocks=()"),
        ("resnet", {"blocks": (1, 0, 1)}, "blocks[1]=0"),
        ("resnet", {"blocks": "111"}, "blocks='111'"),
        ("resnet", {"in_channels": 0}, "in_channels=0"),
        ("mobilenetv2", {"width_mult": 0}, "width_mult=0"),
        ("mobilenetv2", {"width_mult": "1"}, "width_mult='1'"),
        ("mobilenetv2", {"dropout": 1.0}, "dropout=1.0"),
        ("mobilenetv2", {"expand_ratio": 0}, "expand_ratio=0"),
        ("mobilenetv2", {"num_classes": 1}, "num_classes=1"),
        ("mlp", {"width": -5}, "MLP: width=-5; allowed an int from 1 to 65_536"),
        ("mlp", {"depth": 10**6}, "MLP: depth=1000000; allowed an int from 0 to 256"),
        ("mlp", {"image_size": 10**30}, "image_size=1000000000000000000000000000000"),
        ("resnet", {"blocks": [1] * 7}, "ResNet: blocks=[1, 1, 1, 1, 1, 1, 1]; allowed 1 to 6 stages"),
        ("resnet", {"blocks": (1, 10**6)}, "blocks[1]=1000000"),
        ("resnet", {"width": 10**5}, "width=100000"),
        ("mobilenetv2", {"width_mult": float("inf")}, "width_mult=inf"),
        ("mobilenetv2", {"width_mult": float("nan")}, "width_mult=nan"),
        ("mobilenetv2", {"dropout": float("nan")}, "dropout=nan"),
        ("mobilenetv2", {"expand_ratio": 10**6}, "expand_ratio=1000000"),
    ],
)
def test_bad_values_name_the_field(name: str, kwargs: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_model(name, **kwargs)


def test_a_model_too_large_is_refused_before_memory_is_spent() -> None:
    """Each argument within its bounds, the whole beyond MAX_PARAMETERS: counted on the meta device."""
    import time

    from lowbit.models import MAX_PARAMETERS

    t0 = time.perf_counter()
    for name, kwargs in [("mlp", {"width": 65_536, "depth": 256}), ("resnet", {"width": 4096, "blocks": [2, 2]}),
                         ("mlp", {"width": 20_000, "depth": 2})]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"model '{name}' with .* parameters is more than the 100_000_000"):
            build_model(name, **kwargs)
    assert time.perf_counter() - t0 < 5.0
    assert n_params(build_model("mlp", width=64, depth=3)) < MAX_PARAMETERS
