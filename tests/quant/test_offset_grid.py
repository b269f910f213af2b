"""The float16-offset grid (``offset: float16``, ``format: q4_1``): values ``s·q + float16(−s·z)`` in training,
in the integer model and in the file, exactly; refused where it cannot be represented."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec
from lowbit.errors import ConfigError, FormatError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))


def _prepared() -> nn.Module:
    return lowbit.prepare(_model(), QuantConfig(weight=QuantSpec(format="q4_1", init="minmax"), act=None))


def test_the_format_fixes_the_q4_1_grid() -> None:
    spec = QuantSpec(format="q4_1")
    assert (spec.bits, spec.symmetric, spec.signed, spec.group_size, spec.scale_dtype, spec.offset) == (
        4, False, False, 32, "float16", "float16")  # fmt: skip
    with pytest.raises(ConfigError, match="offset='float16'.*symmetric: false"):
        QuantSpec(bits=4, offset="float16")
    with pytest.raises(ConfigError, match="offset='float32'"):
        QuantSpec(bits=4, symmetric=False, offset="float32")


def test_values_are_s_q_plus_a_float16_minimum_against_a_naive_reference() -> None:
    model = _prepared()
    layer = model[0]
    q = layer.weight_quantizer
    with torch.no_grad():  # move the zero points off integers: rounding must happen where it is used
        q.zero_point.add_(torch.rand(q.zero_point.shape, generator=torch.Generator().manual_seed(1)) * 0.8 - 0.4)
    s = q.scale.detach().half().float()  # float16 scales (the parameter trains in float32)
    z = q.zero_point.detach().clamp(0, 15).round()
    w = layer.weight.detach().reshape(32, 2, 32)
    ints = torch.clamp(torch.round(w / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, 15)
    naive = ints * s.unsqueeze(-1) + (-(s * z)).half().float().unsqueeze(-1)
    assert torch.equal(layer.quantized_weight().detach(), naive.reshape(32, 64))
    assert not torch.equal(naive, (ints - z.unsqueeze(-1)) * s.unsqueeze(-1))  # the offset's rounding shows
    layer.quantized_weight().sum().backward()
    assert q.scale.grad is not None and q.zero_point.grad is not None and layer.weight.grad is not None


def test_convert_save_load_are_exact_and_the_file_says_offset(tmp_path: Path) -> None:
    model = _prepared().eval()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
        int_model = lowbit.convert(model)
        assert torch.equal(int_model(x), ref)
        path = lowbit.save(int_model, tmp_path / "m.safetensors")
        assert torch.equal(lowbit.load(path, model=_model())(x), ref)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["layers"]["0"]["offset"] == "float16" and meta["layers"]["0"]["signed"] is False


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(offset="float32"), r"layers\['0'\]\.offset='float32'"),
    (lambda e: e.update(offset=1), r"layers\['0'\]\.offset=1"),
])  # fmt: skip
def test_a_tampered_offset_is_refused_by_field(tmp_path: Path, change, message: str) -> None:  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    from lowbit.checkpoint import digest

    path = lowbit.save(lowbit.convert(_prepared()), tmp_path / "m.safetensors")
    meta = json.loads((tmp_path / "m.json").read_text())
    change(meta["layers"]["0"])
    tensors = load_file(str(path))
    meta.pop("sha256")
    meta["sha256"] = digest(meta, tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"lowbit": json.dumps(meta)})
    with pytest.raises(FormatError, match=message):
        lowbit.load(tmp_path / "bad.safetensors", model=_model())


def test_where_the_offset_cannot_go_it_is_refused_by_name(tmp_path: Path) -> None:
    from lowbit.export.onnx import export_onnx

    with pytest.raises(ConfigError, match=r"layer '0'.*float16 offset.*GGUF"):
        export_onnx(lowbit.convert(_prepared()), tmp_path / "m.onnx", torch.randn(1, 64))
    with pytest.raises(ConfigError, match=r"layer '0': lowrank.*offset='float16'"):
        lowbit.prepare(_model(), QuantConfig(weight=QuantSpec(format="q4_1"), act=None, lowrank=LowRankSpec(rank=2)))
