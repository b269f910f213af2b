"""``lowbit.save`` / ``lowbit.load``: exact round trips at every bit width, sizes, and a fuzzed loader."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit import ConfigError, FormatError, QuantConfig, QuantSpec, Rule
from lowbit.models import build_model


def _prepared(name: str = "mobilenetv2", bits: int = 4, **spec: object) -> nn.Module:
    torch.manual_seed(0)
    args = {"mobilenetv2": {"width_mult": 0.5}, "resnet": {"width": 8, "blocks": [1, 1]}, "mlp": {"width": 32}}[name]
    model = build_model(name, num_classes=10, **args)
    cfg = QuantConfig(weight=QuantSpec(bits=bits, **spec), act=QuantSpec(bits=bits), first_last_bits=8)
    calib = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))]
    lowbit.prepare(model, cfg, calib=calib)
    model.train()
    for x in calib:  # move the batch-norm statistics off their defaults
        model(x)
    return model.eval()


X = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_round_trip_is_exact_at_every_bit_width(tmp_path: Path, bits: int) -> None:
    model = _prepared(bits=bits)
    ref = model(X)
    lowbit.save(model, tmp_path / "m.safetensors")
    loaded = lowbit.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded(X), ref)
    assert not loaded.training
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["format_version"] == 3 and meta["architecture"]["registry"] == "mobilenetv2"


@pytest.mark.parametrize(
    "name, spec",
    [
        ("resnet", {"granularity": "tensor"}),
        ("resnet", {"symmetric": False}),
        ("mlp", {"granularity": "group", "group_size": 16}),
        ("mlp", {"granularity": "channel", "symmetric": False}),
    ],
)
def test_round_trip_granularities_and_zero_points(tmp_path: Path, name: str, spec: dict) -> None:
    model = _prepared(name, bits=3, **spec)
    lowbit.save(model, tmp_path / "m.safetensors")
    assert torch.equal(lowbit.load(tmp_path / "m.safetensors")(X), model(X))


def test_float16_scales_are_stored_in_half_the_bytes_and_reload_exactly(tmp_path: Path) -> None:
    """scale_dtype: float16 (MobileNetV2's depthwise layers: a scale per output channel of 9 weights, and
    groups of 16 in the MLP): weight scales go to the file as float16, and the model reloads exactly."""
    from safetensors import safe_open

    cases = (("mobilenetv2", {"granularity": "channel"}), ("mlp", {"granularity": "group", "group_size": 16}))
    for name, spec in cases:
        sizes = {}
        for dtype in ("float32", "float16"):
            model = _prepared(name, bits=4, scale_dtype=dtype, **spec)
            path = tmp_path / f"{name}-{dtype}.safetensors"
            lowbit.save(model, path)
            assert torch.equal(lowbit.load(path)(X), model(X))
            with safe_open(str(path), "pt") as f:
                scales = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".weight_scale")}  # noqa: SIM118
            assert scales == ({"F16"} if dtype == "float16" else {"F32"})
            sizes[dtype] = path.stat().st_size
        assert sizes["float16"] < sizes["float32"]


def test_load_into_a_skeleton_and_float_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    skeleton = copy.deepcopy(model)
    cfg = QuantConfig(weight=QuantSpec(bits=4), act=QuantSpec(bits=4), rules=[Rule(match="4", weight=None)])
    lowbit.prepare(model, cfg, calib=[X])
    model.eval()
    lowbit.save(model, tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="records no architecture"):
        lowbit.load(tmp_path / "m.safetensors")
    loaded = lowbit.load(tmp_path / "m.safetensors", model=skeleton)
    assert loaded is skeleton
    assert torch.equal(loaded(X), model(X))


def test_file_is_near_the_packed_size(tmp_path: Path) -> None:
    model = _prepared("resnet", bits=2)
    path = lowbit.save(model, tmp_path / "m.safetensors")
    int_model = lowbit.convert(model)
    packed = sum(
        -(-m.qweight.weight_int.numel() * m.qweight.weight_bits // 8)
        for m in int_model.modules()
        if hasattr(m, "qweight") and hasattr(m.qweight, "weight_int")
    )
    weights = sum(m.qweight.weight_int.numel() for m in int_model.modules() if hasattr(m, "qweight"))
    assert packed < weights  # well below one byte per weight
    assert path.stat().st_size < packed + 40_000  # packed weights + scales, BN, biases, metadata


def test_saving_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    model = _prepared("mlp")
    lowbit.save(model, tmp_path / "m.safetensors")
    lowbit.save(model, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_wrong_skeleton_and_missing_file(tmp_path: Path) -> None:
    model = _prepared("mlp")
    lowbit.save(model, tmp_path / "m.safetensors")
    with pytest.raises(FormatError, match="shape"):
        lowbit.load(tmp_path / "m.safetensors", model=build_model("mlp", num_classes=10, width=16))
    with pytest.raises(FormatError, match="does not exist"):
        lowbit.load(tmp_path / "nope.safetensors")


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    lowbit.save(_prepared("resnet", bits=3), path)
    return path.read_bytes()


def test_fuzzed_files_load_correctly_or_raise_format_error(tmp_path: Path, saved_bytes: bytes) -> None:
    """Hundreds of truncations and byte flips of a real file: only FormatError, or the exact model."""
    good = tmp_path / "good.safetensors"
    good.write_bytes(saved_bytes)
    expect = lowbit.load(good)(X)
    rng = random.Random(0)
    header_len = int.from_bytes(saved_bytes[:8], "little") + 8
    outcomes = {"format_error": 0, "loaded": 0}
    for i in range(300):
        data = bytearray(saved_bytes)
        kind = i % 3
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        else:
            # flips anywhere, and half of them inside the header / metadata
            lo, hi = (0, header_len) if kind == 1 else (0, len(data))
            for _ in range(rng.randint(1, 3)):
                j = rng.randrange(lo, hi)
                data[j] ^= 1 << rng.randrange(8)
        path = tmp_path / f"f{i}.safetensors"
        path.write_bytes(bytes(data))
        try:
            out = lowbit.load(path)(X)
        except FormatError:
            outcomes["format_error"] += 1
        else:
            assert torch.equal(out, expect), f"case {i} loaded a different model"
            outcomes["loaded"] += 1
        path.unlink()
    assert outcomes["format_error"] >= 250
