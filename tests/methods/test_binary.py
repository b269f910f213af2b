"""The ``binary`` method: binary weights routed to CEMA, Bop or latent Adam by the loop, flip ratios, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import lowbit
from lowbit.checkpoint import load_checkpoint
from lowbit.config import recipe_from_dict
from lowbit.errors import ConfigError, FormatError
from lowbit.methods import METHODS, attach_methods, build_methods
from lowbit.methods.binary import Binary, binary_layers
from lowbit.methods.binary_optim import flip_ratio
from lowbit.run import run

torch.set_num_threads(1)

TINY: dict[str, Any] = {
    "name": "b",
    "data": {"name": "synthetic", "train_subset": 640, "test_subset": 200, "batch_size": 64},
    "model": {"name": "mlp", "args": {"width": 32, "depth": 2, "act": "hardtanh"}},
    "pretrain": {"epochs": 1},
    "quant": {"weight": {"bits": 1, "granularity": "channel", "binary": {"scale": "one"}},
              "act": {"bits": 1, "binary": {"scale": "one", "grad": "approxsign"}}},
    "qat": {"epochs": 2, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0},
    "checkpoint_every": 3,
}  # fmt: skip


def _recipe(optimizer: str, **extra: Any) -> Any:
    settings = {"cema": {"alpha": 0.05, "gamma": 0.2}, "bop": {"threshold": 1e-4, "gamma": 0.05},
                "adam": {"lr": 0.01}}[optimizer]  # fmt: skip
    return recipe_from_dict({**TINY, "methods": [{"name": "binary", "optimizer": optimizer, **settings}], **extra})


def test_registered_and_settings_checked() -> None:
    assert METHODS["binary"] is Binary
    for bad, match in (({"optimizer": "sgd"}, "optimizer='sgd'"), ({"alpha": 2.0}, "alpha=2.0"),
                       ({"threshold": -1.0}, "threshold=-1.0"), ({"gamma": 0}, "gamma=0")):  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            build_methods([{"name": "binary", **bad}], 1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lowbit.prepare(model, lowbit.QuantConfig(weight=lowbit.QuantSpec(bits=4), act=None))
    with pytest.raises(ConfigError, match="no binary weight"):
        attach_methods(build_methods([{"name": "binary"}], 1), model)


@pytest.mark.parametrize("optimizer", ["cema", "bop", "adam"])
def test_a_binary_run_trains_logs_flips_and_saves_one_bit_weights(optimizer: str, tmp_path: Path) -> None:
    summary = run(_recipe(optimizer), tmp_path / "r", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    qat = [r for r in rows if r["stage"] == "qat"]
    assert qat and all(0 <= r["flip_ratio"] <= 1 for r in qat) and qat[0]["flip_ratio"] > 0
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "qat.safetensors")
    opt_state = state["optimizers"][-1]  # the method's optimizer comes after the stage's own
    buffers = {"cema": {"momentum_buffer", "inertia_buffer"}, "bop": {"momentum_buffer"},
               "adam": {"exp_avg", "exp_avg_sq", "step"}}[optimizer]  # fmt: skip
    assert all(set(s) == buffers for s in opt_state["state"].values())
    assert len(state["schedulers"]) == 2  # the stage's weights and the method's optimizer (α / γ / lr scheduled)
    model = lowbit.load(tmp_path / "r" / "model.safetensors")
    meta = json.loads((tmp_path / "r" / "model.json").read_text())
    binary = [n for n, e in meta["layers"].items() if e.get("grid") == "binary"]
    assert binary == ["features.4"]  # the hidden layer; the first and last stay 8-bit
    assert model is not None and summary["quant_metric"] > 0
    assert f"Binary weights ({optimizer})" in (tmp_path / "r" / "report.html").read_text()
    assert (tmp_path / "r" / "plots" / "flip_ratio.png").exists()
    if optimizer in ("cema", "bop"):  # the parameters hold the binary weights themselves
        w = state["model"]["features.4.weight"]
        assert bool(((w == 1) | (w == -1)).all())


def test_cema_resumes_bit_exactly(tmp_path: Path, interrupt_method: None) -> None:
    marker = tmp_path / "fired"
    stop = {"name": "interrupt", "at": 8, "marker": str(marker)}
    recipe = _recipe("cema")
    recipe = recipe_from_dict({**TINY, "methods": [*lowbit.config.recipe_to_dict(recipe)["methods"], stop]})
    marker.touch()
    ref = run(recipe, tmp_path / "ref", progress=False)
    marker.unlink()
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "cut", progress=False)
    resumed = run(recipe, tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "qat.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "qat.safetensors")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizers"][-1]["state"].values(), b["optimizers"][-1]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert resumed["quant_metric"] == ref["quant_metric"]


def test_flip_ratio_is_the_share_of_binary_weights_that_changed_sign() -> None:
    torch.manual_seed(0)
    model = lowbit.prepare(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)), lowbit.QuantConfig(
        weight=lowbit.QuantSpec(bits=1, binary=lowbit.config.BinarySpec(scale="one")), act=None))  # fmt: skip
    (m,) = build_methods([{"name": "binary"}], 4)
    attach_methods([m], model)
    before = [layer.weight.detach().clone() for _, layer in binary_layers(model)]
    with torch.no_grad():
        model[0].weight[:2].neg_()  # 2 rows of 8: 16 of 72 binary weights flip
    m.step(1)
    assert m.last == pytest.approx(16 / 72)
    after = [layer.weight.detach() for _, layer in binary_layers(model)]
    assert m.last == pytest.approx(sum(flip_ratio(x, y) * x.numel() for x, y in zip(before, after, strict=True)) / 72)
    assert m.metrics(model) == {"flip_ratio": pytest.approx(16 / 72), "flip_ratio_last": pytest.approx(16 / 72)}
    state = m.state_dict()
    with pytest.raises(FormatError, match="binary state"):
        m.load_state_dict({**state, "signs": {k: torch.zeros_like(v) for k, v in state["signs"].items()}})
    assert math.isfinite(state["flips"])
