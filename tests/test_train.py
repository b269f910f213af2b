"""The training loop: resume equality (also after kill -9), non-finite loss, damaged checkpoints.

All on the synthetic dataset: nothing here depends on real images, and it needs no installed data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import Interrupt

from lowbit import methods as methods_mod
from lowbit.checkpoint import load_checkpoint
from lowbit.config import recipe_from_dict
from lowbit.errors import FormatError, TrainingError
from lowbit.run import run

TINY = {
    "name": "t",
    "data": {"name": "synthetic", "train_subset": 640, "test_subset": 200, "batch_size": 64},
    "model": {"name": "mlp", "args": {"width": 32, "depth": 2}},
    "pretrain": {"epochs": 1},
    "qat": {"epochs": 2},
    "checkpoint_every": 3,
}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "qat.safetensors")["model"]


def test_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, interrupt_method: None) -> None:
    ref = run(recipe_from_dict(TINY), tmp_path / "ref", progress=False)
    marker = str(tmp_path / "fired")
    recipe = recipe_from_dict({**TINY, "methods": [{"name": "interrupt", "at": 7, "marker": marker}]})
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "cut", progress=False)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "qat.safetensors")["step"] == 6
    resumed = run(recipe, tmp_path / "cut", resume=True, progress=False)
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["quant_metric"] == ref["quant_metric"]
    # metrics.jsonl holds each QAT eval once, with the same numbers
    def qat_rows(d: str) -> list[str]:
        return [r for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines() if '"qat"' in r]

    assert qat_rows("cut") == qat_rows("ref")


def test_resume_after_kill_9(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import Interrupt
        from test_train import TINY
        from lowbit import methods
        from lowbit.config import recipe_from_dict
        from lowbit.run import run
        methods.METHODS["interrupt"] = Interrupt
        at = int(sys.argv[3])
        m = {{"name": "interrupt", "at": at, "marker": sys.argv[1] + ".fired", "hard": True}}
        recipe = recipe_from_dict({{**TINY, "methods": [m]}})
        run(recipe, Path(sys.argv[1]), resume=sys.argv[2] == "1", progress=False)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "k"), "0", "5"], env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "k" / "checkpoints" / "qat.safetensors")["step"] == 3
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "k"), "1", "5"], env=env, timeout=300)
    assert proc.returncode == 0
    ref_dir = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", script, str(ref_dir), "0", "-1"], env=env, check=True, timeout=300)
    a, b = _weights(ref_dir), _weights(tmp_path / "k")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@dataclass(frozen=True)
class NanAtSettings:
    at: int


class NanAt(Interrupt):
    """A test method whose extra loss is NaN from a given step on."""

    Settings = NanAtSettings  # type: ignore[assignment]

    def __init__(self, total_steps: int, at: int) -> None:  # type: ignore[override]
        self.at, self.now = at, 0

    def loss(self, model, batch=None, outputs=None):  # noqa: ANN001, ANN201
        return torch.tensor(float("nan")) if self.now >= self.at else None

    def step(self, step: int) -> None:
        self.now = step


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(methods_mod.METHODS, "nan_at", NanAt)
    recipe = recipe_from_dict({**TINY, "methods": [{"name": "nan_at", "at": 7}]})
    with pytest.raises(TrainingError, match=r"loss became nan at step 7 of stage 'qat'.*last good checkpoint"):
        run(recipe, tmp_path / "r", progress=False)
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "qat.safetensors")
    assert state["step"] == 6
    for v in state["model"].values():
        if v.is_floating_point():
            assert torch.isfinite(v).all()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_on_resume_is_a_format_error(tmp_path: Path, damage: str) -> None:
    recipe = recipe_from_dict(TINY)
    run(recipe, tmp_path / "r", progress=False)
    ck = tmp_path / "r" / "checkpoints" / "qat.safetensors"
    blob = ck.read_bytes()
    if damage == "truncate":
        ck.write_bytes(blob[: len(blob) // 2])
    elif damage == "garbage":
        ck.write_bytes(blob[:8] + b"\xff" * 64 + blob[72:])
    else:
        ck.write_bytes(b"")
    with pytest.raises(FormatError, match="qat.safetensors"):
        run(recipe, tmp_path / "r", resume=True, progress=False)


def test_float_checkpoint_is_cached_across_bit_widths(tmp_path: Path) -> None:
    s4 = run(recipe_from_dict(TINY), tmp_path / "w4", progress=False)
    cache = list((tmp_path / ".cache").glob("float-*.safetensors"))
    assert len(cache) == 1
    t3 = recipe_from_dict({**TINY, "quant": {"weight": {"bits": 3, "granularity": "channel"}}})
    s3 = run(t3, tmp_path / "w3", progress=False)
    assert len(list((tmp_path / ".cache").glob("float-*.safetensors"))) == 1
    assert s3["float_metric"] == s4["float_metric"]
    assert not (tmp_path / "w3" / "checkpoints" / "pretrain.safetensors").exists()


def test_summary_has_the_contract_keys(tmp_path: Path) -> None:
    s = run(recipe_from_dict(TINY), tmp_path / "r", progress=False)
    for key in (
        "recipe", "dataset", "model", "float_metric", "quant_metric", "metric_name",
        "weight_bits", "act_bits", "float_bytes", "quant_bytes", "train_seconds",
    ):
        assert key in s
    assert s["quant_bytes"] < s["float_bytes"]
    for f in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (tmp_path / "r" / f).is_file()


@dataclass(frozen=True)
class OwnSGDSettings:
    lr: float = 0.0


class OwnSGD:
    """A test method that optimizes the last layer's bias itself (SGD at its own lr), as binary methods will."""

    Settings = OwnSGDSettings

    def __init__(self, total_steps: int, lr: float = 0.0) -> None:
        self.lr = lr

    def param_groups(self, model):  # noqa: ANN001, ANN201
        return [{"params": [model.classifier.bias], "lr": self.lr, "optimizer": torch.optim.SGD}]

    def attach(self, model):  # noqa: ANN001, ANN201
        pass

    def loss(self, model, batch=None, outputs=None):  # noqa: ANN001, ANN201
        return None

    def step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_a_method_optimizes_its_own_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """param_groups: the bias leaves the stage's SGD; at lr 0 under the method's own SGD it stays put."""
    monkeypatch.setitem(methods_mod.METHODS, "own_sgd", OwnSGD)
    recipe = recipe_from_dict({**TINY, "methods": [{"name": "own_sgd"}], "qat": {"epochs": 1}})
    run(recipe, tmp_path / "r", progress=False)
    start = load_checkpoint(tmp_path / ".cache" / next(p.name for p in (tmp_path / ".cache").iterdir()))["model"]
    end = _weights(tmp_path / "r")
    assert torch.equal(end["classifier.bias"], start["classifier.bias"])
    assert not torch.equal(end["classifier.weight"], start["classifier.weight"])
    state = load_checkpoint(tmp_path / "r" / "checkpoints" / "qat.safetensors")
    assert len(state["optimizers"]) == 3  # weights, scales, and the method's own
