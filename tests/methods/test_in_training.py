"""The oscillation methods and BN re-estimation inside real runs: metrics, report, eval, exact resume.

The runs use the synthetic dataset (no installed data needed): the methods, not the images, are tested.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from lowbit import methods as methods_mod
from lowbit.checkpoint import load_checkpoint
from lowbit.cli import main
from lowbit.config import recipe_from_dict
from lowbit.run import run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import Interrupt  # noqa: E402  (the test method that interrupts a run at a given step)

METHODS = [
    {"name": "oscillation_freezing", "start": 0.0, "threshold_start": 0.05, "threshold_final": 0.02, "momentum": 0.02},
    {"name": "oscillation_dampening", "start": 0.2, "lambda_final": 0.05, "momentum": 0.02},
    {"name": "bn_reestimation", "num_batches": 3},
]
SMALL = {
    "name": "osc",
    "data": {"name": "synthetic", "train_subset": 768, "test_subset": 256, "batch_size": 64},
    "model": {"name": "mobilenetv2", "args": {"width_mult": 0.5}},
    "pretrain": {"epochs": 1},
    "quant": {"weight": {"bits": 3}, "act": {"bits": 3}},
    "qat": {"epochs": 2, "lr": 0.05},
    "checkpoint_every": 5,
    "methods": METHODS,
}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_run_logs_oscillations_reestimates_bn_and_writes_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = run(recipe_from_dict(SMALL), tmp_path / "osc", progress=False)
    rows = _rows(tmp_path / "osc")
    qat = [r for r in rows if r["stage"] == "qat"]
    assert len(qat) == 2 and all("train_loss" in r for r in qat)
    osc = qat[-1]["oscillation"]
    assert osc["tracked"] > 0 and 0.0 <= osc["oscillating"] <= 1.0 and osc["frozen"] > 0.0
    assert all(v["bits"] == 3 for v in osc["layers"].values()), "8-bit first/last layers are not tracked"
    final = [r for r in rows if r["stage"] == "final"]
    assert len(final) == 1 and final[0]["before_finish_accuracy"] == qat[-1]["test_accuracy"]
    assert summary["quant_metric"] == final[0]["test_accuracy"]
    assert summary["qat_metric"] == qat[-1]["test_accuracy"]
    assert summary["methods"] == ["oscillation_freezing", "oscillation_dampening", "bn_reestimation"]
    # BN re-estimation changed the statistics the integer model uses
    state = load_checkpoint(tmp_path / "osc" / "checkpoints" / "qat.safetensors")
    assert any(k.endswith("int_transform.frozen") for k in state["model"])
    html = (tmp_path / "osc" / "report.html").read_text()
    assert "Oscillation" in html or "oscillation" in html
    assert sorted(p.name for p in (tmp_path / "osc" / "plots").glob("*.png"))
    # `lowbit eval` rebuilds the same final model (methods attached, BN re-estimated again)
    assert main(["eval", str(tmp_path / "osc"), "--json"]) == 0
    numbers = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert numbers["integer"]["accuracy"] == summary["quant_metric"]


def test_resume_keeps_freezing_and_dampening_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods_mod.METHODS, "interrupt", Interrupt)
    small = {**SMALL, "methods": METHODS[:2], "data": {**SMALL["data"], "train_subset": 512}}
    ref = run(recipe_from_dict(small), tmp_path / "ref", progress=False)
    cut = {**small, "methods": [*METHODS[:2], {"name": "interrupt", "at": 12, "marker": str(tmp_path / "m")}]}
    with pytest.raises(KeyboardInterrupt):
        run(recipe_from_dict(cut), tmp_path / "cut", progress=False)
    resumed = run(recipe_from_dict(cut), tmp_path / "cut", resume=True, progress=False)
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "qat.safetensors")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "qat.safetensors")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["methods"][1] == b["methods"][1] == {"t": 16}
    assert resumed["quant_metric"] == ref["quant_metric"]
    qat = [r for r in _rows(tmp_path / "cut") if r["stage"] == "qat"]
    assert [r["oscillation"] for r in qat] == [r["oscillation"] for r in _rows(tmp_path / "ref") if r["stage"] == "qat"]
