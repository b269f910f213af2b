"""The `lowbit` command: a real smoke run of a tiny recipe (on the synthetic dataset), clear one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.data import load_dataset

REPO = Path(__file__).resolve().parents[1]


def lowbit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lowbit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_train_then_eval_tiny_recipe(tmp_path: Path) -> None:
    # the synthetic dataset: the command is under test, not the images (and it needs no installed data)
    overrides = ["data.name=synthetic", "data.train_subset=512"]
    p = lowbit("train", str(REPO / "recipes" / "tiny.yaml"), *overrides, "--runs", str(tmp_path), "--no-progress",
               cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "W4A4 accuracy" in p.stdout and "quantized size" in p.stdout
    assert "W4A4 (W8A8 as used: the mean over layers)" in p.stdout
    run_dir = tmp_path / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "synthetic" and summary["nominal_bits"] == {"weight": 4, "act": 4}
    # both of its linears are the first and last layers, kept at 8 bits: the summary says what was used
    assert summary["weight_bits"] == 8 and summary["act_bits"] == 8
    assert summary["quant_metric"] > 30.0  # well above chance (10 %): it did learn
    cfg = (run_dir / "config.yaml").read_text()
    assert "train_subset: 512" in cfg and "name: synthetic" in cfg  # the overrides are in the resolved recipe
    e = lowbit("eval", str(run_dir), "--json", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    numbers = json.loads(e.stdout.strip().splitlines()[-1])
    assert numbers["integer"]["accuracy"] == pytest.approx(summary["quant_metric"])
    # the run exported its integer model; `lowbit export` writes the same file again; it reloads exactly
    from lowbit import load as load_model
    from lowbit.tasks.vision import evaluate_classifier as evaluate

    exported = run_dir / "model.safetensors"
    assert summary["quant_bytes"] == exported.stat().st_size
    data = load_dataset("synthetic")
    acc = evaluate(load_model(exported), data.test_x[:500], data.test_y[:500])["accuracy"]  # test_subset: 500
    assert acc == pytest.approx(summary["quant_metric"])
    x = lowbit("export", str(run_dir), "--out", str(tmp_path / "again.safetensors"), cwd=tmp_path)
    assert x.returncode == 0, x.stderr
    assert (tmp_path / "again.safetensors").read_bytes() == exported.read_bytes()
    # a finished run is not overwritten by accident
    again = lowbit("train", str(REPO / "recipes" / "tiny.yaml"), *overrides, "--runs", str(tmp_path), cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "no-such-recipe"], "recipe 'no-such-recipe' not found"),
        (["train", "tiny", "qat.epochz=2"], "unknown key 'qat.epochz'"),
        (["train", "tiny", "quant.weight.bits=9"], "bits=9"),
        (["train", "tiny", "quant.weight.group_size=7"], "group_size"),
        (["train", "tiny", "qat.epochs"], "write key=value"),
        (["eval", "/nonexistent/run"], "has no config.yaml"),
    ],
)
def test_bad_input_is_one_clear_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_recipes_lists_the_shipped_recipes(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for f in (REPO / "recipes").glob("*.yaml"):
        assert f.stem in out
