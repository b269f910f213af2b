"""``export_onnx``: onnxruntime agrees with ``lowbit.convert``; integer initializers, types and QDQ counts."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import lowbit  # noqa: E402
from lowbit import ConfigError, QuantConfig, QuantSpec  # noqa: E402
from lowbit.api import quantized_layers  # noqa: E402
from lowbit.export.onnx import export_onnx  # noqa: E402
from lowbit.models import build_model  # noqa: E402

CALIB = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
X = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
INT4, UINT4, INT8, UINT8 = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8,
                            onnx.TensorProto.UINT8)


def _tiny() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Flatten(), nn.Linear(8 * 14 * 14, 10),
    )


def _prepared(name: str, weight: QuantSpec | None, act: QuantSpec | None, **cfg: object) -> nn.Module:
    torch.manual_seed(0)
    args = {"mobilenetv2": {"width_mult": 0.25}, "mlp": {"width": 32}}
    model = _tiny() if name == "tiny" else build_model(name, num_classes=10, **args[name])
    model.train()
    model(CALIB)  # batch-norm statistics off their defaults
    model.eval()
    act = act.replace(init="minmax") if act is not None else None  # MSE search over activations is slow
    return lowbit.prepare(model, QuantConfig(weight=weight, act=act, **cfg), calib=[CALIB])


def _run(path: Path, x: torch.Tensor, outputs: list[str] | None = None) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(outputs, {"input": x.numpy()})


def _inits(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


CASES = [  # model, weight bits, act bits, weight granularity, weight symmetric, act signed
    ("tiny", 8, 8, "tensor", True, None),
    ("tiny", 4, 4, "channel", True, None),
    ("tiny", 4, 4, "tensor", False, False),
    ("tiny", 3, 3, "channel", False, True),
    ("tiny", 3, 3, "tensor", True, False),
    ("mlp", 4, 4, "channel", True, None),
    ("mlp", 8, 8, "channel", False, True),
    ("mobilenetv2", 4, 4, "channel", True, None),
    ("mobilenetv2", 3, 3, "tensor", True, False),
    ("mobilenetv2", 8, 8, "channel", True, True),
]


@pytest.mark.parametrize("name, wbits, abits, gran, sym, signed", CASES)
def test_onnxruntime_agrees_with_the_integer_model(
    tmp_path: Path, name: str, wbits: int, abits: int, gran: str, sym: bool, signed: bool | None
) -> None:
    weight = QuantSpec(bits=wbits, granularity=gran, symmetric=sym)
    model = _prepared(name, weight, QuantSpec(bits=abits, signed=signed))
    ref = lowbit.convert(model)(X).detach().numpy()
    path = export_onnx(model, tmp_path / "m.onnx", X[:1])
    out = _run(path, X)[0]
    assert out.shape == ref.shape  # the batch dimension is dynamic (exported with batch 1)
    _assert_close(out, ref)


def _assert_close(out: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to float summation order (1e-4 of the output scale), except where an activation sits
    within an ulp of a rounding boundary and lands one integer step away (see the module docstring):
    that is allowed in a few samples, and the predicted class must agree nearly everywhere."""
    close = np.abs(out - ref).max(axis=1) <= 1e-4 * np.abs(ref).max()
    assert close.mean() >= 0.95, f"{(~close).sum()} of {len(close)} samples differ"
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95


def _onnx_type(bits: int, signed: bool, opset: int = 21) -> int:
    if bits <= 4 and opset >= 21:
        return INT4 if signed else UINT4
    return INT8 if signed else UINT8


@pytest.mark.parametrize(
    "bits, gran, sym, opset",
    [(8, "tensor", True, 21), (8, "channel", False, 21), (4, "channel", True, 21), (4, "tensor", False, 21),
     (3, "channel", True, 21), (2, "channel", False, 21), (4, "channel", True, 20), (3, "tensor", False, 13)],
)
def test_weight_initializers_hold_the_integer_weights(tmp_path: Path, bits: int, gran: str, sym: bool, opset: int):
    model = lowbit.convert(_prepared("tiny", QuantSpec(bits=bits, granularity=gran, symmetric=sym), QuantSpec(bits=8)))
    path = export_onnx(model, tmp_path / "m.onnx", X[:1], opset=opset)
    inits = _inits(path)
    for name, mod in quantized_layers(model):
        qw = mod.qweight
        t = inits[f"{name}.weight_int"]
        assert t.data_type == _onnx_type(bits, sym, opset), name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t).astype(np.int32), qw.weight_int.numpy())
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[f"{name}.weight_scale"]), qw.weight_scale)
        if sym:
            assert f"{name}.weight_zero_point" not in inits
        else:
            z = inits[f"{name}.weight_zero_point"]
            assert z.data_type == t.data_type
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(z).astype(np.float32), qw.weight_zero_point)
    if bits <= 4 and opset >= 21:  # packed two to a byte
        assert len(inits["7.weight_int"].raw_data) == (10 * 8 * 14 * 14 + 1) // 2
    _assert_close(_run(path, X)[0], model(X).detach().numpy())


@pytest.mark.parametrize("abits", [8, 4, 3])
def test_qdq_node_counts(tmp_path: Path, abits: int) -> None:
    model = _prepared("mobilenetv2", QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=abits),
                      first_last_bits=8)
    layers = quantized_layers(model)
    n_act = sum(m.input_quantizer is not None for _, m in layers)
    assert n_act == len(layers) - 1  # the first layer's input stays float
    ops = _ops(export_onnx(model, tmp_path / "m.onnx", X[:1]))
    assert ops.count("QuantizeLinear") == n_act
    assert ops.count("DequantizeLinear") == n_act + len(layers)
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert ops.count("Clip") == relu6 + (n_act - 1 if abits < 8 else 0)  # the last layer's input is 8-bit
    assert ops.count("Conv") + ops.count("Gemm") == len(layers)
    assert ops.count("BatchNormalization") == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert ops.count("Add") == sum(getattr(m, "use_residual", False) for m in model.modules())


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("signed, sym, gran", [(True, True, "tensor"), (False, True, "tensor"),
                                               (False, False, "tensor"), (True, False, "channel")])
def test_activation_qdq_equals_the_input_quantizer(tmp_path: Path, bits: int, signed: bool, sym: bool, gran: str):
    """The first layer sees the graph input itself, so its Q/DQ output must equal lowbit's quantizer exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4))
    x = 3 * torch.randn(512, 16)
    act = QuantSpec(bits=bits, signed=signed, symmetric=sym, granularity=gran)
    lowbit.prepare(model, QuantConfig(weight=QuantSpec(bits=4), act=act), calib=[x[:64]])
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    proto = onnx.load(str(path))
    proto.graph.output.append(onnx.helper.make_tensor_value_info("0.input_dq", onnx.TensorProto.FLOAT, None))
    onnx.save(proto, str(path))
    q = lowbit.convert(model)[0].input_quantizer
    qdq = _run(path, x, ["0.input_dq"])[0]
    np.testing.assert_array_equal(qdq, q(x).numpy())
    assert max(len(np.unique(col)) for col in qdq.T) <= 2**bits  # the narrow grid, not the 8-bit one
    assert ("Clip" in _ops(path) or "Max" in _ops(path)) == (bits < 8)


def test_group_wise_weights_use_block_size(tmp_path: Path) -> None:
    group = QuantSpec(bits=4, granularity="group", group_size=8)
    rules = [lowbit.Rule(match="0", weight=QuantSpec(bits=4, granularity="channel")),
             lowbit.Rule(match="3", weight=group.replace(group_size=3)),  # (8, 1, 3, 3): groups of 3 of 9
             lowbit.Rule(match="7", weight=group.replace(group_size=30))]  # 1568 = 52 × 30 + a ragged 8
    model = _prepared("tiny", group, QuantSpec(bits=4), rules=rules)
    path = export_onnx(model, tmp_path / "m.onnx", X[:1])
    int_model = lowbit.convert(model)
    for name, block in [("7", 30), ("3", 3)]:
        qw = dict(quantized_layers(int_model))[name].qweight
        dq = next(n for n in onnx.load(str(path)).graph.node if n.name == f"{name}.weight_dq")
        assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": block}
        t = _inits(path)[f"{name}.weight_int"]
        assert t.data_type == INT4
        q = onnx.numpy_helper.to_array(t).astype(np.int32)
        np.testing.assert_array_equal(q.reshape(qw.weight_int.shape), qw.weight_int.numpy())
    _assert_close(_run(path, X)[0], int_model(X).detach().numpy())
    with pytest.raises(ConfigError, match="group-wise .* opset >= 21.*granularity='channel'"):
        export_onnx(model, tmp_path / "old.onnx", X[:1], opset=20)


def test_prepared_and_converted_models_give_the_same_file(tmp_path: Path) -> None:
    model = _prepared("mlp", QuantSpec(bits=4, granularity="channel"), QuantSpec(bits=4))
    int_model = lowbit.convert(model).train()
    a = export_onnx(model, tmp_path / "a.onnx", X[:1]).read_bytes()
    b = export_onnx(int_model, tmp_path / "b.onnx", X[:1]).read_bytes()
    assert a == b
    assert int_model.training  # the caller's mode is restored


def test_float_ops_of_binary_networks_run_like_torch(tmp_path: Path) -> None:
    """PReLU (one slope and per channel), AvgPool2d (padding, ceil mode) and LearnableBias, with a layer between."""
    from lowbit.models.birealnet import LearnableBias

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), LearnableBias(8), nn.PReLU(8, init=0.1), nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), nn.PReLU(init=-0.3),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LearnableBias | nn.PReLU):
                next(m.parameters()).normal_()  # away from their initial constants
    model = lowbit.prepare(model, QuantConfig(weight=QuantSpec(bits=8), act=None), calib=[CALIB])
    ref = lowbit.convert(model)(X).detach().numpy()
    path = export_onnx(model, tmp_path / "m.onnx", X[:1])
    assert {"PRelu", "AveragePool"} <= set(_ops(path))
    np.testing.assert_allclose(_run(path, X)[0], ref, rtol=1e-5, atol=1e-5)
    bad = lowbit.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.AvgPool2d(2, divisor_override=3)),
                         QuantConfig(weight=QuantSpec(bits=8), act=None), calib=[CALIB])  # fmt: skip
    with pytest.raises(ConfigError, match="divisor_override=3"):
        export_onnx(bad, tmp_path / "bad.onnx", X[:1])


def test_the_binary_cnn_runs_in_onnxruntime_like_the_integer_model(tmp_path: Path) -> None:
    """BiRealNet on its recipe's grids (binary 3×3 blocks, 8-bit stem, shortcuts and classifier), trained a
    few steps so batch-norm outputs move off exact zeros (where another summation order flips a sign)."""
    from lowbit.config import load_recipe

    torch.manual_seed(0)
    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "birealnet-binary.yaml")
    model = lowbit.prepare(build_model("birealnet", num_classes=10, width=8, blocks=1), recipe.quant, calib=[CALIB])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        opt.zero_grad()
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    ref = lowbit.convert(model)(X).detach().numpy()
    path = export_onnx(model, tmp_path / "m.onnx", X[:1])
    ops = _ops(path)
    # 3 binary blocks (sign by Where); 8-bit inputs of 2 shortcuts and the classifier (the stem reads the image)
    assert ops.count("Where") == 3 and ops.count("QuantizeLinear") == 3
    _assert_close(_run(path, X)[0], ref)


class _Keep(nn.Module):
    def forward(self, x_int: torch.Tensor, quantizer: nn.Module) -> torch.Tensor:
        return x_int


def test_unsupported_ops_and_arguments_are_config_errors(tmp_path: Path) -> None:
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.fc(x), x], dim=1)

    x = torch.randn(4, 8)
    cfg = QuantConfig(weight=QuantSpec(bits=4), act=QuantSpec(bits=4))
    with pytest.raises(ConfigError, match="'cat'.* not supported by the ONNX export"):
        export_onnx(lowbit.prepare(Cat(), cfg, calib=[x]), tmp_path / "m.onnx", x[:1])
    gelu = lowbit.prepare(nn.Sequential(nn.Linear(8, 4), nn.GELU()), cfg, calib=[x])
    with pytest.raises(ConfigError, match=r"module '1' \(GELU\) is not supported"):
        export_onnx(gelu, tmp_path / "m.onnx", x[:1])
    for opset in (12, "21", 999):
        with pytest.raises(ConfigError, match="opset="):
            export_onnx(gelu, tmp_path / "m.onnx", x[:1], opset=opset)  # type: ignore[arg-type]
    reflect = lowbit.prepare(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")), cfg, calib=[X])
    with pytest.raises(ConfigError, match="padding_mode='reflect'"):
        export_onnx(reflect, tmp_path / "m.onnx", X[:1])
    transformed = lowbit.convert(lowbit.prepare(nn.Sequential(nn.Linear(8, 4)), cfg, calib=[x]))
    transformed[0].input_quantizer.int_transform = _Keep()  # a method acting on activation integers
    with pytest.raises(ConfigError, match="integer transform .*QDQ cannot express"):
        export_onnx(transformed, tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnx_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r'pip install "lowbit\[export\]"'):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(1, 8))
