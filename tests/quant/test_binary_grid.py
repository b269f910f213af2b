"""The binary grid {−s, +s} (``QuantSpec.binary``): values, gradients, prepare → convert → save → load,
1-bit storage, ONNX, and files that lie about it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lowbit
from lowbit.config import BinarySpec, QuantConfig, QuantSpec, recipe_from_dict
from lowbit.errors import ConfigError, FormatError
from lowbit.quant import functional as F
from lowbit.quant.modules import quantized_layers
from lowbit.quant.quantizer import Quantizer

torch.set_num_threads(1)


def test_sign_ste_gradients_against_their_formulas() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 3.0], requires_grad=True)
    for grad, want in (("clip", [0, 1, 1, 1, 1, 1, 0]), ("approxsign", [0, 0, 1, 2, 1.5, 0, 0])):
        y = F.sign_ste(x, grad)
        assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1]  # sign(0) = +1
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.tolist() == want, grad


@pytest.mark.parametrize("mode", ["mean_abs", "learned", "one"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_binary_weight_values(mode: str, granularity: str) -> None:
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    q = Quantizer(QuantSpec(bits=1, granularity=granularity, binary=BinarySpec(scale=mode)), tuple(w.shape))
    from lowbit.quant.calibrate import init_range

    init_range(q, w)
    y = q(w)
    dims = (1,) if granularity == "channel" else (0, 1)
    m = w.abs().mean(dim=dims, keepdim=True)
    want = torch.where(w >= 0, 1.0, -1.0) * (1.0 if mode == "one" else m)
    torch.testing.assert_close(y, want.expand_as(w), rtol=0, atol=0)
    assert q.int_grid() == (-1, 1) and q.nbits == 1
    assert torch.equal(q.to_int(w), torch.where(w >= 0, 1, -1).to(torch.int32))
    assert isinstance(q.scale, nn.Parameter) == (mode == "learned")
    with pytest.raises(ValueError, match="binary quantizer"):
        q.set_bits(2)


def test_mean_abs_follows_the_weights_and_learned_scales_get_gradients() -> None:
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    q = Quantizer(QuantSpec(bits=1, granularity="channel", binary=BinarySpec(scale="mean_abs")), (4, 3))
    with torch.no_grad():
        w.mul_(3)
    q(w)
    torch.testing.assert_close(q.scale, w.detach().abs().mean(1))  # export reads what the last call used
    ql = Quantizer(QuantSpec(bits=1, granularity="channel", binary=BinarySpec(scale="learned")), (4, 3))
    ql(w).sum().backward()
    torch.testing.assert_close(ql.scale.grad, torch.where(w >= 0, 1.0, -1.0).sum(1))


def test_binary_specs_that_cannot_exist_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="binary"):
        QuantSpec(bits=2, binary=BinarySpec())
    with pytest.raises(ConfigError, match="granularity"):
        QuantSpec(bits=1, granularity="group", group_size=4, binary=BinarySpec())
    with pytest.raises(ConfigError, match=r"quant\.weight\.binary\.scale='max'"):
        recipe_from_dict({"quant": {"weight": {"bits": 1, "binary": {"scale": "max"}}}})
    with pytest.raises(ConfigError, match="activations"):
        Quantizer(QuantSpec(bits=1, binary=BinarySpec(scale="mean_abs")), None)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x))
        x = self.bn2(self.conv2(x))
        return self.fc2(self.fc1(x.flatten(1)))


def _binary_model(weight_scale: str = "mean_abs") -> nn.Module:
    torch.manual_seed(0)
    cfg = QuantConfig(
        weight=QuantSpec(bits=1, granularity="channel", binary=BinarySpec(scale=weight_scale)),
        act=QuantSpec(bits=1, binary=BinarySpec(scale="one", grad="approxsign")),
        first_last_bits=8,
    )
    g = torch.Generator().manual_seed(2)
    return lowbit.prepare(Net(), cfg, calib=[torch.randn(8, 1, 8, 8, generator=g)])


def _train(model: nn.Module, steps: int = 3) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(steps):
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("weight_scale", ["mean_abs", "learned", "one"])
def test_train_convert_save_load_are_exact_and_binary_layers_take_one_bit(weight_scale: str, tmp_path: Path) -> None:
    model = _binary_model(weight_scale)
    kinds = {n: (m.weight_quantizer.spec.binary is not None) for n, m in quantized_layers(model)}
    assert kinds == {"conv1": False, "conv2": True, "fc1": True, "fc2": False}  # first/last at 8 bits
    g = torch.Generator().manual_seed(4)
    _train(model)
    x = torch.randn(4, 1, 8, 8, generator=g)
    with torch.no_grad():
        ref = model(x)
        int_model = lowbit.convert(model)
        assert torch.equal(int_model(x), ref)
        path = lowbit.save(int_model, tmp_path / "m.safetensors")
        loaded = lowbit.load(path, model=Net())
        assert torch.equal(loaded(x), ref)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["format_version"] == 3
    assert meta["layers"]["conv2"]["grid"] == "binary" and meta["layers"]["conv2"]["input"]["grid"] == "binary"
    assert "grid" not in meta["layers"]["conv1"]
    with safe_open(str(path), "pt") as f:
        for name in ("conv2", "fc1"):
            n = math.prod(meta["layers"][name]["shape"])
            assert f.get_tensor(f"{name}.weight_packed").numel() == math.ceil(n / 8)
            stored = math.ceil(n / 8) + 4 * f.get_tensor(f"{name}.weight_scale").numel()
            assert stored <= 1.05 * (4 * n) / 32 + 4 * meta["layers"][name]["shape"][0]  # 1/32 plus its scales


def _rewrite(path: Path, edit) -> Path:  # noqa: ANN001 - a metadata editor
    """A copy of the file whose metadata ``edit`` changed, re-signed (an attacker can recompute digests)."""
    from lowbit.checkpoint import digest

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = json.loads(f.metadata()["lowbit"])
    meta.pop("sha256")
    edit(meta)
    meta["sha256"] = digest(meta, tensors)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata={"lowbit": json.dumps(meta)})
    return out


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"]["conv2"].update(grid="ternary"), "grid"),
    (lambda m: m["layers"]["conv2"].update(bits=2), "grid 'binary'"),
    (lambda m: m["layers"]["conv2"]["input"].update(grid="sign"), "grid"),
    (lambda m: m["layers"]["conv2"].pop("grid"), "conv2"),  # then 1-bit {-1, 0} codes but a binary scale
    (lambda m: m.update(format_version=4), "format_version=4"),
])  # fmt: skip
def test_a_file_that_lies_about_its_grid_is_refused(edit, match: str, tmp_path: Path) -> None:  # noqa: ANN001
    model = _binary_model()
    path = lowbit.save(lowbit.convert(model.eval()), tmp_path / "m.safetensors")
    bad = _rewrite(path, edit)
    try:
        loaded = lowbit.load(bad, model=Net())
    except FormatError as e:
        assert match in str(e)
        return
    # dropping the grid leaves a valid 1-bit {-1, 0} file: it loads, and it is a different model
    assert match == "conv2"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(loaded(x), lowbit.load(path, model=Net())(x))


def test_onnx_runs_binary_layers_like_the_integer_model(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from lowbit.export.onnx import export_onnx

    # trained: an untrained batch norm (mean 0, bias 0) after ±1 inputs puts many values exactly on 0, where
    # the runtime's other summation order (1e-7 apart) flips the next sign; trained biases move them off it
    model = _train(_binary_model(), steps=20)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    path = export_onnx(model, tmp_path / "m.onnx", x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = lowbit.convert(model)(x).numpy()
    assert abs(got - ref).max() < 1e-4


def test_low_rank_layers_refuse_the_binary_grid() -> None:
    from lowbit.config import LowRankSpec

    cfg = QuantConfig(weight=QuantSpec(bits=1, binary=BinarySpec()), act=None, lowrank=LowRankSpec(rank=2))
    with pytest.raises(ConfigError, match="binary grid"):
        lowbit.prepare(nn.Sequential(nn.Linear(8, 8)), cfg)


def test_oscillation_tracking_counts_binary_sign_flips_back_and_forth() -> None:
    """A weight whose sign goes + − + − oscillates (each change reverses the last); + − − + once."""
    from lowbit.methods.oscillation import OscillationTracking

    torch.manual_seed(0)
    model = lowbit.prepare(nn.Sequential(nn.Linear(2, 1, bias=False)),
                           QuantConfig(weight=QuantSpec(bits=1, binary=BinarySpec(scale="one")), act=None))  # fmt: skip
    signs = [(1, 1), (-1, -1), (1, -1), (-1, 1), (1, 1)]  # weight 0: + - + - +; weight 1: + - - + +
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.5, 0.5]]))
    m = OscillationTracking(8, momentum=1.0)
    m.attach(model)
    for step, (a, b) in enumerate(signs[1:], start=1):
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[0.5 * a, 0.5 * b]]))
        m.step(step)
    tracker = next(t for t in model.modules() if type(t).__name__ == "OscillationTracker")
    assert int(tracker.oscillations) == 3 + 1  # weight 0 reverses at steps 2, 3, 4; weight 1 at step 3
