"""Every shipped recipe parses, round-trips, and smoke-runs a few steps of each stage.

A vision recipe whose dataset is not installed smoke-runs on the synthetic dataset instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict
from lowbit.data import load_dataset
from lowbit.errors import DatasetMissingError
from lowbit.run import run

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes() -> None:
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_round_trips(path: Path) -> None:
    r = load_recipe(path)
    assert recipe_from_dict(recipe_to_dict(r)) == r
    assert path.read_text().lstrip().startswith("#"), "each recipe opens with a one-line description"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_smoke_runs(path: Path, tmp_path: Path) -> None:
    small = [
        "data.train_subset=256",
        "data.test_subset=128",
        "data.batch_size=64",
        "pretrain.max_steps=2",
        "qat.max_steps=2",
    ]
    recipe = load_recipe(path, small)
    if recipe.task == "causal_lm":
        # An LLM recipe: its quant section (bits, grid, low-rank kind) and stage settings, run for 2 steps
        # on a random 2-layer LLaMA and a small text file (the real model and corpora are the benchmark's job).
        text = tmp_path / "text.txt"
        text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
        llm_small = [
            "model.name=random-llama", f"data.name=file:{text}", f"text.other_corpus=file:{text}", "qat.steps=2",
            "text.eval_windows=1", "text.eval_window=64", "text.seq_len=32", "quant.weight.init=minmax",
            "qat.eval_every=0", "checkpoint_every=0",
        ]  # fmt: skip
        summary = run(load_recipe(path, small + llm_small), tmp_path / path.stem, progress=False)
        assert summary["quant_metric"] > 1.0 and summary["steps"] == 2
        assert summary["quant_bytes"] < summary["float_bytes"]
        return
    try:
        load_dataset(recipe.data.name)
    except DatasetMissingError:  # not installed here: the same recipe on the synthetic dataset
        recipe = load_recipe(path, [*small, "data.name=synthetic"])
    summary = run(recipe, tmp_path / path.stem, progress=False)
    assert summary["dataset"] == recipe.data.name
    assert 0.0 <= summary["quant_metric"] <= 100.0
    assert summary["quant_bytes"] < summary["float_bytes"]
