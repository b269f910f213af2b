"""Grid sweeps over recipe keys: ``lowbit sweep RECIPE key=[v1,v2,...] ... [key=value ...]``.

Each ``key=[...]`` argument (a YAML list) is one axis of the grid; ``key=value`` (not a list) is a fixed
override for every cell. To sweep a key whose values are themselves lists, write a list of lists
(``model.args.blocks=[[1,1,1],[2,2,2]]``); ``key=[[1,1,1]]`` sets one list value. A grid of more than
``max_cells`` cells (``MAX_CELLS`` by default) is refused before any cell is built. Every cell's recipe is
built and checked (keys, values, model arguments, dataset and method names, which layers the rules
match) before anything runs, and an error names the cell, the key, the value and what is allowed. When
``quant.weight.bits`` is swept, cells that differ only in it must quantize some layer differently: where
``first_last_bits`` or rules fix the bits of every quantized layer (a two-layer MLP under
``first_last_bits: 8``), the cells would be one model under several labels, and the sweep says so.

Cells run one after another through ``lowbit.train.run``, each into its own run directory
``<runs>/sweeps/<name>/<cell>/``; they share the float-checkpoint cache ``<runs>/sweeps/<name>/.cache/``,
so cells that differ only after pre-training (bit widths, QAT settings) train the float model once.
Rerunning the same command skips finished cells (same resolved recipe, ``summary.json`` present; a
config written before lowbit gained a new field still counts when it resolves to the same recipe) and
resumes an interrupted one from its checkpoints; a cell whose recipe changed runs again from scratch (its
old checkpoints and results are replaced).

Results (``results.csv``, ``results.md``, ``accuracy``, ``gap``, ``ecr`` and ``memory`` PNGs): one row per
cell with the float, direct-quantization (before QAT) and retrained (after QAT, integer model)
accuracies, the parameter count, the realised mean weight bits (``mean_weight_bits`` of the run's
summary: first and last layers and rules included), sizes in bits (float: float32 parameters and buffers;
quantized: the packed payload, ``quant_payload_bytes``) and the effective compression ratio (ECR, Sung et al. 2015;
``lowbit.methods.resiliency``). Cells that differ only in ``seed`` are replicates (mean ± sd in
``results.md`` and on the plots); other swept keys that are neither ``model.*`` keys nor
``quant.weight.bits`` split the plots and ECR into panels (``lowbit.sweep.results``). Within a panel the
float networks of every size form the error-versus-size curve that ECR reads, and the x axis is the
parameter count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from lowbit.checkpoint import atomic_write_text
from lowbit.config import QuantSpec, Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from lowbit.errors import ConfigError, TrainingError
from lowbit.sweep.results import PRECISION_KEY, write_results
from lowbit.sweep.results import fmt_value as _fmt
from lowbit.sweep.results import short_names as _short_names
from lowbit.validate import check_int, parse_yaml

__all__ = ["MAX_CELLS", "Cell", "collect_rows", "parse_grid", "plan_cells", "run_sweep"]

log = logging.getLogger(__name__)

MAX_CELLS = 256  # each cell is a training run; the largest shipped benchmark sweep has 72


@dataclass
class Cell:
    """One point of the grid: its values, its validated recipe and its run directory."""

    name: str
    values: dict[str, Any]
    recipe: Recipe
    run_dir: Path

    def config_text(self) -> str:
        return yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False)  # as lowbit.train.run writes it

    def _same_recipe(self) -> bool:
        """Whether the run directory holds this cell's recipe: the same text, or a config that resolves
        to the same recipe (written before lowbit gained a field whose default changes nothing)."""
        cfg = self.run_dir / "config.yaml"
        if not cfg.is_file():
            return False
        text = cfg.read_text()
        if text == self.config_text():
            return True
        try:
            return recipe_from_dict(parse_yaml(text, str(cfg))) == self.recipe
        except ConfigError:
            return False

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file() and self._same_recipe()

    def resumable(self) -> bool:
        """Same recipe: continue from the checkpoints (the config is rewritten in today's spelling)."""
        if not self._same_recipe():
            return False
        atomic_write_text(self.run_dir / "config.yaml", self.config_text())
        return True


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _yaml(value: Any) -> str:
    """``value`` as YAML flow text, which ``parse_yaml`` reads back (JSON would turn .inf into a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return text.removesuffix("\n...\n").strip()


def parse_grid(items: Sequence[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """``key=[v1,v2]`` arguments -> ({key: values}, fixed ``key=value`` overrides), in the given order."""
    grid: dict[str, list[Any]] = {}
    fixed: list[str] = []
    seen: set[str] = set()
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"sweep argument {item!r} is not allowed: write key=[v1,v2,...] (an axis) or key=value (fixed)"
            )
        key, raw = (s.strip() for s in item.split("=", 1))
        if not key:
            raise ConfigError(f"sweep argument {item!r} is not allowed: the key before '=' is empty")
        if key in seen:
            raise ConfigError(f"sweep key {key!r} is given twice: give each key once")
        seen.add(key)
        value = parse_yaml(raw, f"sweep {key}={raw!r}: the value") if raw != "" else None
        if not isinstance(value, list):
            fixed.append(f"{key}={raw}")
            continue
        if not value:
            raise ConfigError(f"sweep {key}=[] has no values: give at least one, e.g. {key}=[1,2]")
        dumped = [_dump(v) for v in value]
        if len(set(dumped)) != len(dumped):
            raise ConfigError(f"sweep {key}={raw}: a value is repeated; give each value once")
        grid[key] = value
    return grid, fixed


def _cell_names(combos: list[dict[str, Any]], keys: list[str]) -> list[str]:
    if not keys:
        return ["run"] * len(combos)
    short = _short_names(keys)
    names = ["_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", f"{short[k]}-{_fmt(c[k])}") for k in keys) for c in combos]
    for i, n in enumerate(names):
        if names.count(n) > 1:  # values that read alike once sanitised: tell them apart by a hash
            names[i] = f"{n}-{hashlib.sha256(_dump(combos[i]).encode()).hexdigest()[:6]}"
    return names


Layers = tuple[tuple[str, int | None], ...]  # (layer name, weight bits) of every quantized layer


def _minmax(spec: Any) -> Any:
    return spec.replace(init="minmax") if isinstance(spec, QuantSpec) else spec


def _check_recipe(recipe: Recipe) -> Layers | None:
    """What ``load_recipe`` cannot see: model arguments and values, dataset and method names, the rules'
    layers. Returns the weight bits of each quantized layer (None for a language model, loaded by its run)."""
    from lowbit.api import prepare, quantized_layers
    from lowbit.data import DATASETS
    from lowbit.methods import build_methods
    from lowbit.models import build_model
    from lowbit.quant.quantizer import Quantizer

    build_methods(recipe.methods, total_steps=1)
    if recipe.task != "classification":
        return None
    if recipe.data.name not in DATASETS:
        raise ConfigError(f"data.name={recipe.data.name!r} is not allowed: known datasets are {', '.join(DATASETS)}")
    model = build_model(recipe.model.name, **recipe.model.args)
    # the run's own layer plan, made cheap: weights only (no calibration data), min-max ranges
    q = recipe.quant
    rules = tuple(dataclasses.replace(r, weight=_minmax(r.weight), act=None) for r in q.rules)
    api_log = logging.getLogger("lowbit.api")  # one layer table per cell would bury the sweep's own lines
    level = api_log.level
    api_log.setLevel(max(level, logging.WARNING))
    try:
        prepare(model, dataclasses.replace(q, weight=_minmax(q.weight), act=None, rules=rules))
    finally:
        api_log.setLevel(level)
    wq = [(n, layer.weight_quantizer) for n, layer in quantized_layers(model)]
    return tuple((n, w.nbits if isinstance(w, Quantizer) else None) for n, w in wq)


def _check_distinct_bits(cells: list[Cell], layers: list[Layers | None], grid: dict[str, list[Any]]) -> None:
    """Refuse cells that differ only in ``quant.weight.bits`` yet quantize every layer alike."""
    if len(grid.get(PRECISION_KEY, [])) < 2:
        return
    seen: dict[str, Cell] = {}
    for cell, lay in zip(cells, layers, strict=True):
        if lay is None:
            continue
        rest = {k: v for k, v in cell.values.items() if k != PRECISION_KEY}
        other = seen.setdefault(_dump([rest, lay]), cell)
        if other is cell:
            continue
        q = cell.recipe.quant
        why = (
            f"quant.first_last_bits={q.first_last_bits} sets the first and last quantized layers, and "
            f"{cell.recipe.model.name} has only {len(lay)} quantized layer{'s' if len(lay) > 1 else ''}"
            if q.first_last_bits is not None and len(lay) <= 2
            else "quant.first_last_bits and the rules fix the bits of every quantized layer"
        )
        shown = ", ".join(f"{n}: {'float' if b is None else b}" for n, b in lay)
        raise ConfigError(
            f"sweep cells {other.name!r} and {cell.name!r} quantize alike (weight bits {shown}): {why}, so "
            f"{PRECISION_KEY} changes nothing; set quant.first_last_bits=null, add layers, or sweep another key"
        )


def plan_cells(
    recipe_path: str | Path,
    items: Sequence[str],
    out_dir: Path,
    name: str | None = None,
    max_cells: int = MAX_CELLS,
) -> tuple[list[Cell], dict[str, list[Any]]]:
    """Every cell of the grid with its validated recipe (nothing runs); raises ConfigError naming the cell,
    or when the grid has more than ``max_cells`` cells."""
    check_int("max_cells", max_cells, 1, 10**6)
    grid, fixed = parse_grid(items)
    keys = list(grid)
    count = math.prod(len(v) for v in grid.values())
    axes = " × ".join(f"{len(v)} {k}" for k, v in grid.items() if len(v) > 1) or "no axis"
    if count > max_cells:
        raise ConfigError(
            f"sweep of {count:_} cells ({axes}) is more than max_cells={max_cells}: each cell is a training run; "
            "sweep fewer values, or raise the limit (--max-cells) if you mean it"
        )
    log.info("sweep %s: %d cell%s (%s)", name or Path(recipe_path).stem, count, "" if count == 1 else "s", axes)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]
    multi = [k for k in keys if len(grid[k]) > 1]
    names = _cell_names(combos, multi)
    sweep_name = name or Path(recipe_path).stem
    cells, layers = [], []
    for combo, cell_name in zip(combos, names, strict=True):
        overrides = [
            *fixed,
            *(f"{k}={_yaml(v)}" for k, v in combo.items()),
            f"name={_dump(f'{sweep_name}-{cell_name}')}",
        ]
        where = ", ".join(f"{k}={_yaml(v)}" for k, v in combo.items()) or "no grid keys"
        try:
            recipe = load_recipe(recipe_path, overrides)
            layers.append(_check_recipe(recipe))
        except ConfigError as e:
            raise ConfigError(f"sweep cell {cell_name!r} ({where}): {e}") from None
        cells.append(Cell(cell_name, {k: combo[k] for k in multi}, recipe, out_dir / cell_name))
    grid = {k: grid[k] for k in multi}
    _check_distinct_bits(cells, layers, grid)
    return cells, grid


def run_sweep(
    recipe_path: str | Path,
    items: Sequence[str],
    runs_root: str | Path = "runs",
    name: str | None = None,
    progress: bool = True,
    cell_progress: bool = False,
    x_key: str | None = None,
    max_cells: int = MAX_CELLS,
) -> tuple[list[dict[str, Any]], Path]:
    """Run every unfinished cell, then write the results; returns (rows, sweep directory). A grid of more
    than ``max_cells`` cells is refused before anything runs.

    A cell that fails (non-finite loss) is logged and the others still run; the results hold the
    finished cells, and a ``TrainingError`` listing the failed ones is raised at the end.
    """
    from lowbit.run import run

    out_dir = Path(runs_root) / "sweeps" / (name or Path(recipe_path).stem)
    cells, grid = plan_cells(recipe_path, items, out_dir, name, max_cells=max_cells)
    model_keys = [k for k in grid if k.startswith("model.")]
    if x_key is not None and x_key not in model_keys:
        raise ConfigError(f"x={x_key!r} is not allowed: use a swept model key ({', '.join(model_keys) or 'none'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    done_before = 0
    bar = tqdm(cells, desc=f"sweep {out_dir.name}", unit="cell", disable=not progress, dynamic_ncols=True)
    for cell in bar:
        bar.set_postfix_str(cell.name)
        if cell.finished():
            done_before += 1
            log.info("sweep: %s is finished, skipped", cell.name)
            continue
        resume = cell.resumable()
        log.info("sweep: %s %s", "resuming" if resume else "running", cell.name)
        try:
            run(cell.recipe, cell.run_dir, resume=resume, progress=cell_progress, force=not resume)
        except TrainingError as e:
            log.error("sweep: cell %s failed: %s", cell.name, e)
            failed.append(cell.name)
    bar.close()
    rows = collect_rows(cells)
    write_results(rows, out_dir, list(grid), x_key=x_key, command=_command(recipe_path, items))
    log.info("sweep: %d cells, %d run now, %d finished before, %d failed", len(cells),
             len(cells) - done_before - len(failed), done_before, len(failed))  # fmt: skip
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(cells)} sweep cells failed ({', '.join(failed)}); the others are in "
            f"{out_dir}; rerun the same command to retry them"
        )
    return rows, out_dir


def _command(recipe_path: str | Path, items: Sequence[str]) -> str:
    return " ".join(
        ["lowbit sweep", str(recipe_path), *(f"'{i}'" if any(c in i for c in " []{}") else i for i in items)]
    )


def _bits(v: Any) -> Any:
    """Mean weight bits as read: 2.0 as 2, else rounded to 3 decimals (labels W2, W2.375)."""
    if isinstance(v, float) and math.isfinite(v):
        return int(v) if v.is_integer() else round(v, 3)
    return v


def collect_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per finished cell (swept values first, then the run's summary), ECR left empty."""
    rows = []
    for cell in cells:
        if not cell.finished():
            continue
        s = json.loads((cell.run_dir / "summary.json").read_text())
        payload = s.get("quant_payload_bytes", s.get("quant_bytes"))
        rows.append(
            {
                **{k: v for k, v in cell.values.items()},
                "cell": cell.name,
                **{k: s.get(k) for k in ("dataset", "model", "num_parameters", "act_bits")},
                "weight_bits": _bits(s.get("mean_weight_bits", s.get("weight_bits"))),
                **{k: s.get(k) for k in ("metric_name", "float_metric", "quant_metric")},
                "direct_metric": s.get("direct_metric"),
                "float_size_bits": 8 * int(s["float_bytes"]) if s.get("float_bytes") is not None else None,
                "quant_size_bits": 8 * int(payload) if payload is not None else None,
                "ecr": None,
                "ecr_direct": None,
                "train_seconds": s.get("train_seconds"),
            }
        )
    return rows
