"""`lowbit sweep`: grid parsing, errors that name the key and value, a real resumable sweep, results."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

import lowbit.run
from lowbit.cli import main
from lowbit.errors import ConfigError, TrainingError
from lowbit.sweep import parse_grid, plan_cells, run_sweep
from lowbit.sweep.results import add_ecr, aggregate

RECIPE = """\
# a seconds-long ternary MLP, on the synthetic dataset (no installed data needed)
data: {name: synthetic, train_subset: 256, test_subset: 128, batch_size: 64}
model: {name: mlp, args: {width: 16, depth: 1}}
pretrain: {epochs: 1}
quant: {weight: {bits: 2}, act: {bits: 8, learn_scale: false}, first_last_bits: null}
qat: {epochs: 1}
methods: [{name: resiliency}]
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    p = tmp_path / "tern.yaml"
    p.write_text(RECIPE)
    return p


def test_grid_axes_and_fixed_overrides() -> None:
    grid, fixed = parse_grid(
        ["model.args.width=[8, 16]", "quant.weight.bits=[2,3]", "qat.epochs=2", "model.args.blocks=[[1,1],[2]]"]
    )
    assert grid == {"model.args.width": [8, 16], "quant.weight.bits": [2, 3], "model.args.blocks": [[1, 1], [2]]}
    assert fixed == ["qat.epochs=2"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("width", r"sweep argument 'width' is not allowed: write key=\[v1,v2,...\]"),
        ("=[1]", r"the key before '=' is empty"),
        ("a.b=[]", r"sweep a.b=\[\] has no values: give at least one"),
        ("a.b=[1, 2, 1]", r"sweep a.b=\[1, 2, 1\]: a value is repeated"),
        ("a.b=[1,", r"sweep a.b='\[1,': the value is not valid YAML"),
    ],
)
def test_bad_grid_arguments(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_grid([item])


def test_a_key_given_twice() -> None:
    with pytest.raises(ConfigError, match=r"sweep key 'seed' is given twice"):
        parse_grid(["seed=[0,1]", "seed=3"])


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("model.argz=[1,2]", r"cell 'argz-1' \(model.argz=1\): unknown key 'model.argz': allowed keys here are name"),
        ("quant.weight.bits=[2,9]", r"cell 'bits-9' \(quant.weight.bits=9\): .*bits=9 is not allowed: an integer from"),
        ("model.args.widht=[8,16]", r"cell 'widht-8'.*unknown argument\(s\) \['widht'\]; accepted: width, depth"),
        ("model.args.width=[0,8]", r"cell 'width-0' \(model.args.width=0\): MLP: width=0; allowed an int from 1 to"),
        ("model.args.width=[-5,8]", r"cell 'width--5' \(model.args.width=-5\): MLP: width=-5; allowed an int from 1"),
        ("model.args.depth=[1,1000000]", r"cell 'depth-1000000'.*MLP: depth=1000000; allowed an int from 0 to 256"),
        ("model.args=[{width: 8}, {width: 60000, depth: 2}]", r"'args-depth2-width60000'.*is more than"),
        ("data.name=[mnist10k,svhn]", r"cell 'name-svhn'.*data.name='svhn' is not allowed: known datasets are"),
        ("methods.0.levels=[3,4]", r"cell 'levels-4'.*levels=4 is not allowed: use null"),
        ("qat.epochs=[1,-1]", r"cell 'epochs--1'.*epochs=-1.0? is not allowed: a number from 0 to 100_000"),
        ("qat.epochs=[1,.inf]", r"'epochs-inf' \(qat.epochs=.inf\): qat.epochs=inf is not allowed: expected a finite"),
        ("seed=[0,18446744073709551616]", r"seed=18446744073709551616 is not allowed: an integer from 0 to 4_294"),
        ("quant.rules=[[{match: nothere}]]", r"rules\[0\].match='nothere' matches no quantizable layer"),
    ],
)
def test_bad_cells_are_named_before_anything_runs(recipe: Path, tmp_path: Path, item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_cells(recipe, [item], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cells_are_named_by_their_values(recipe: Path, tmp_path: Path) -> None:
    cells, grid = plan_cells(
        recipe, ["model.args.width=[8,16]", "seed=[0]", "data.split_seed=[0,1]", "qat.lr=0.01"], tmp_path
    )
    # "_" separates keys, so it is replaced inside names
    assert [c.name for c in cells] == ["width-8_split-seed-0", "width-8_split-seed-1", "width-16_split-seed-0",
                                       "width-16_split-seed-1"]  # fmt: skip
    assert grid == {"model.args.width": [8, 16], "data.split_seed": [0, 1]}  # one-value axes are fixed
    assert all(c.recipe.qat.lr == 0.01 and c.recipe.name == f"tern-{c.name}" for c in cells)
    cells, _ = plan_cells(recipe, ["pretrain.lr=[0.1,0.2]", "qat.lr=[0.1,0.2]"], tmp_path, name="x")
    assert cells[1].name == "pretrain-lr-0.1_qat-lr-0.2" and cells[0].recipe.name == "x-pretrain-lr-0.1_qat-lr-0.1"


def test_ecr_is_computed_per_panel_and_seed() -> None:
    def row(width: int, bits: int, seed: int, ds: str, fl: float, q: float) -> dict[str, Any]:
        n = {8: 1000, 16: 2000, 32: 4000}[width]
        return {"model.args.width": width, "quant.weight.bits": bits, "seed": seed, "data.name": ds,
                "metric_name": "accuracy", "num_parameters": n, "weight_bits": bits, "float_metric": fl,
                "direct_metric": None, "quant_metric": q, "float_size_bits": 32 * n, "quant_size_bits": bits * n,
                "dataset": ds, "model": "mlp"}  # fmt: skip

    rows = [row(w, 2, s, ds, 100 - e, 100 - e - (2 if ds == "b" else 0)) for w, e in ((8, 8), (16, 6), (32, 4))
            for s in (0, 1) for ds in ("a", "b")]  # fmt: skip
    keys = ["data.name", "model.args.width", "quant.weight.bits", "seed"]
    add_ecr(rows, keys)
    ecr = {(r["data.name"], r["model.args.width"], r["seed"]): r["ecr"] for r in rows}
    # panel a: lossless, so each network matches itself: 32/2; panel b: 2 points worse = one size halving
    assert ecr[("a", 16, 1)] == pytest.approx(16.0) and ecr[("b", 16, 0)] == pytest.approx(8.0)
    assert ecr[("b", 8, 0)] is None  # worse than the smallest float network of its panel
    agg = aggregate(rows, keys)
    assert len(agg) == 6 and all(a["replicates"] == 2 for a in agg)
    b32 = next(a for a in agg if a["data.name"] == "b" and a["model.args.width"] == 32)
    assert b32["gap_mean"] == pytest.approx(2.0) and b32["ecr_of_means"] == pytest.approx(8.0)
    a16 = next(a for a in agg if a["data.name"] == "a" and a["model.args.width"] == 16)
    assert a16["ecr_of_means"] == pytest.approx(16.0)


def test_sweep_runs_every_cell_once_and_resumes(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[tuple[str, bool]] = []
    real_run = lowbit.run.run

    def counting_run(
        recipe: Any, run_dir: Path, resume: bool = False, progress: bool = True, force: bool = False
    ) -> dict[str, Any]:
        calls.append((run_dir.name, resume))
        return real_run(recipe, run_dir, resume=resume, progress=progress, force=force)

    monkeypatch.setattr(lowbit.run, "run", counting_run)
    runs = tmp_path / "runs"
    grid = ["model.args.width=[8,16]", "quant.weight.bits=[2,3]"]
    assert main(["sweep", str(recipe), *grid, "--runs", str(runs), "--no-progress"]) == 0
    out = runs / "sweeps" / "tern"
    names = ["width-8_bits-2", "width-8_bits-3", "width-16_bits-2", "width-16_bits-3"]
    assert calls == [(n, False) for n in names]
    assert len(list((out / ".cache").glob("float-*.safetensors"))) == 2  # one float model per width
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["cell"] for r in rows] == names
    assert {r["weight_bits"] for r in rows} == {"2", "3"} and all(r["direct_metric"] for r in rows)
    assert rows[0]["float_metric"] == rows[1]["float_metric"]  # the same cached float network
    printed = capsys.readouterr().out
    assert "| width | bits | params | W bits | float % | direct % | retrained %" in printed
    for png in ("accuracy.png", "gap.png", "ecr.png", "memory.png"):
        assert (out / png).stat().st_size > 1000

    calls.clear()  # finished cells are skipped
    rows_before = (out / "results.csv").read_text()
    run_sweep(recipe, grid, runs, progress=False)
    assert calls == [] and (out / "results.csv").read_text() == rows_before
    cfg = out / names[0] / "config.yaml"  # written before a field existed (at its default): still finished
    assert "checkpoint_every: 0\n" in cfg.read_text()
    cfg.write_text(cfg.read_text().replace("checkpoint_every: 0\n", ""))
    run_sweep(recipe, grid, runs, progress=False)
    assert calls == []

    (out / names[1] / "summary.json").unlink()  # interrupted after its config was written: resumed
    (out / names[2] / "config.yaml").write_text("name: other\n")  # another recipe: run again from scratch
    run_sweep(recipe, grid, runs, progress=False)
    assert calls == [(names[1], True), (names[2], False)]

    calls.clear()  # a failing cell does not stop the others; the error names it at the end
    (out / names[0] / "summary.json").unlink()
    (out / names[3] / "summary.json").unlink()

    def failing_run(
        recipe: Any, run_dir: Path, resume: bool = False, progress: bool = True, force: bool = False
    ) -> dict[str, Any]:
        if run_dir.name == names[0]:
            raise TrainingError("loss became nan")
        return counting_run(recipe, run_dir, resume, progress, force)

    monkeypatch.setattr(lowbit.run, "run", failing_run)
    with pytest.raises(TrainingError, match=r"1 of 4 sweep cells failed \(width-8_bits-2\)"):
        run_sweep(recipe, grid, runs, progress=False)
    assert calls == [(names[3], True)]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 3


def test_cli_errors_name_the_key(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(recipe), "quant.weight.bits=[2,9]", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "lowbit sweep: error: sweep cell 'bits-9' (quant.weight.bits=9)" in err and "from 1 to 8" in err
    assert main(["sweep", str(recipe), "model.args.width=[8,16]", "--x", "seed", "--runs", str(tmp_path)]) == 2
    assert "x='seed' is not allowed: use a swept model key (model.args.width)" in capsys.readouterr().err


def test_llm_summaries_give_a_table_without_plots(tmp_path: Path) -> None:
    """LLM runs report perplexity: tables yes; ECR and plots (read from an error curve) no."""
    from lowbit.cli import find_recipe
    from lowbit.sweep import collect_rows
    from lowbit.sweep.results import write_results

    cells, grid = plan_cells(find_recipe("llm-tiny"), ["quant.weight.bits=[3,4]"], tmp_path / "s")
    for i, cell in enumerate(cells):
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "config.yaml").write_text(cell.config_text())
        summary = {"task": "causal_lm", "model": "random-llama", "dataset": "shakespeare", "weight_bits": 3 + i,
                   "metric_name": "perplexity", "float_metric": 250.0, "direct_metric": 251.0 - i,
                   "quant_metric": 244.0 + i, "float_bytes": 400_000, "quant_bytes": 100_000,
                   "num_parameters": 90_000}  # fmt: skip
        (cell.run_dir / "summary.json").write_text(json.dumps(summary))
    rows = collect_rows(cells)
    assert [r["direct_metric"] for r in rows] == [251.0, 250.0]
    paths = write_results(rows, tmp_path / "s", list(grid))
    assert [p.name for p in paths] == ["results.csv", "results.md"]
    md = (tmp_path / "s" / "results.md").read_text()
    assert "| bits | params | W bits | float (perplexity) |" in md
    assert "| 3 | 90,000 | 3 | 250.00 | 251.00 | 244.00 |" in md


def test_interrupted_sweep_says_how_to_continue(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lowbit.sweep
    from lowbit.cli import main

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lowbit.sweep, "run_sweep", interrupted)
    assert main(["sweep", "tiny", "quant.weight.bits=[2,3]"]) == 130
    assert "continue with the same `lowbit sweep` command" in capsys.readouterr().err


def test_a_million_cells_are_refused_before_anything_runs(
    recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from lowbit.sweep import MAX_CELLS

    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cell ran")

    monkeypatch.setattr(lowbit.run, "run", no_run)
    axes = [f"seed={list(range(1000))}", f"qat.lr={[round(0.001 * i, 3) for i in range(1, 1001)]}"]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"sweep of 1_000_000 cells \(1000 seed × 1000 qat.lr\) is more than "
                       r"max_cells=256: each cell is a training run"):  # fmt: skip
        run_sweep(recipe, axes, tmp_path / "runs", progress=False)
    assert time.perf_counter() - t0 < 2.0 and not (tmp_path / "runs").exists()
    assert MAX_CELLS == 256
    grid = ["model.args.width=[8,16]", "seed=[0,1]"]
    with pytest.raises(ConfigError, match=r"sweep of 4 cells \(2 model.args.width × 2 seed\) is more than max_cells=3"):
        plan_cells(recipe, grid, tmp_path / "out", max_cells=3)
    assert len(plan_cells(recipe, grid, tmp_path / "out", max_cells=4)[0]) == 4
    with pytest.raises(ConfigError, match=r"max_cells=0 is not allowed"):
        plan_cells(recipe, grid, tmp_path / "out", max_cells=0)


def test_cells_that_quantize_alike_are_refused(recipe: Path, tmp_path: Path) -> None:
    """The README's old example: a one-hidden-layer MLP has two linears, both at first_last_bits."""
    bits = "quant.weight.bits=[2,4]"
    with pytest.raises(ConfigError, match=r"sweep cells 'bits-2' and 'bits-4' quantize alike \(weight bits "
                       r"features.1: 8, classifier: 8\): quant.first_last_bits=8 sets the first and last quantized "
                       r"layers, and mlp has only 2 quantized layers, so quant.weight.bits changes"):  # fmt: skip
        plan_cells(recipe, [bits, "quant.first_last_bits=8"], tmp_path / "out")
    rule = "quant.rules=[[{match: 'features.*', weight: {bits: 8}}, {match: classifier, weight: {bits: 8}}]]"
    with pytest.raises(ConfigError, match=r"quantize alike .* the rules fix the bits of every quantized layer"):
        plan_cells(recipe, [bits, rule], tmp_path / "out")
    # a hidden layer left to quant.weight.bits, or no first/last override: the cells differ
    cells, _ = plan_cells(recipe, [bits, "quant.first_last_bits=8", "model.args.depth=2"], tmp_path / "out")
    assert [c.name for c in cells] == ["bits-2", "bits-4"]
    assert len(plan_cells(recipe, [bits], tmp_path / "out")[0]) == 2
    assert not (tmp_path / "out").exists()


def _summary_row(tmp_path: Path, recipe: Path, items: list[str], summaries: list[dict[str, Any]]) -> tuple:
    from lowbit.sweep import collect_rows

    cells, grid = plan_cells(recipe, items, tmp_path / "s")
    for cell, summary in zip(cells, summaries, strict=True):
        cell.run_dir.mkdir(parents=True)
        (cell.run_dir / "config.yaml").write_text(cell.config_text())
        base = {"dataset": "synthetic", "model": "mlp", "metric_name": "accuracy", "float_metric": 80.0,
                "direct_metric": 70.0, "quant_metric": 75.0, "float_bytes": 40_000, "quant_bytes": 4_000,
                "num_parameters": 10_000, "weight_bits": 2, "act_bits": 8}  # fmt: skip
        (cell.run_dir / "summary.json").write_text(json.dumps({**base, **summary}))
    return collect_rows(cells), grid


def test_rows_carry_the_realised_mean_weight_bits(recipe: Path, tmp_path: Path) -> None:
    rows, _ = _summary_row(tmp_path, recipe, ["seed=[0,1,2]"],
                           [{"mean_weight_bits": 2.3751}, {"mean_weight_bits": 2.0}, {}])  # fmt: skip
    assert [r["weight_bits"] for r in rows] == [2.375, 2, 2]  # the last summary predates mean_weight_bits


@pytest.mark.parametrize("items", [["quant.weight.bits=[2]"], ["quant.weight.bits=[2,3]", "seed=[0,1]"]])
def test_one_network_size_plots_without_a_traceback(recipe: Path, tmp_path: Path, items: list[str]) -> None:
    """One float size: no float curve, so no ECR; the ECR plot says so instead of failing on a log axis."""
    from lowbit.sweep.results import write_results

    n = len(plan_cells(recipe, items, tmp_path / "plan")[0])
    rows, grid = _summary_row(tmp_path, recipe, items, [{"quant_metric": 75.0 + i} for i in range(n)])
    paths = write_results(rows, tmp_path / "s", list(grid))
    assert sorted(p.name for p in paths if p.suffix == ".png") == ["accuracy.png", "ecr.png", "gap.png", "memory.png"]
    assert all(r["ecr"] is None for r in rows)
