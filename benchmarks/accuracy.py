"""Accuracy of LSQ QAT against the float model: Fashion-MNIST, W8A8 / W4A4 / W3A3, and what closes the gap.

For each model and seed, the float model is trained once by ``lowbit train``'s own pipeline (cached
under ``runs/.cache``), then each bit width runs the same QAT stage from it (same epochs, lr, data
order) through ``lowbit.run.run``; the quantized accuracy is that of the converted integer model.
First conv and last linear stay at 8 bits (the usual LSQ setup). Targets: W8A8 within 0.1 points of
FP32, W4A4 within 0.3, W3A3 within 1.

``--ingredients`` runs each named change to the default recipe (``INGREDIENTS``) on its own, or joined
with ``+`` (``distill+dwchannel``); ``base`` is the recipe unchanged. ``--qat-epochs`` takes several
lengths. Every (model, bits, ingredient, length) row averages ``--seeds``.

    .venv/bin/python benchmarks/accuracy.py [--models mobilenetv2 resnet] [--bits 8 4 3] [--seeds 0 1]
        [--ingredients base distill dwchannel+distill] [--qat-epochs 1 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LSQ_BASELINE, RUNS_DIR, machine_line, markdown_table  # noqa: E402

from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from lowbit.run import run  # noqa: E402
from lowbit.validate import apply_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy.md"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
TARGETS = {8: 0.1, 4: 0.3, 3: 1.0}

# MobileNetV2's depthwise convolutions (lowbit.models.mobilenet): the first block has no expansion conv
_DEPTHWISE = ("features.1.conv.0.0", "features.*.conv.1.0")
# name -> (recipe overrides, methods appended to the recipe's); a method's settings are YAML flow mappings
INGREDIENTS: dict[str, tuple[list[str], list[str]]] = {
    "base": ([], []),
    "distill": ([], ["{name: distill}"]),  # KL to the float model's logits, weight 1, T 1
    "dwchannel": (  # one activation scale per channel at the depthwise convolutions' inputs
        ["quant.rules=[" + ", ".join(f"{{match: '{m}', act: {{granularity: channel}}}}" for m in _DEPTHWISE) + "]"],
        [],
    ),
    "warmup": (["qat.warmup=0.1"], []),  # linear warm-up over the first 10 % of QAT, then cosine
    "bnre": ([], ["{name: bn_reestimation, num_batches: 50}"]),  # batch-norm statistics re-estimated after QAT
    "autogrid": (["quant.act.symmetric=auto"], []),  # asymmetric activation grids where the data are skewed
    "osc": (  # constant lr (where the oscillation methods mattered) + iterative freezing + BN re-estimation
        ["qat.schedule=constant"],
        ["{name: oscillation_freezing, threshold_start: 0.1, threshold_final: 0.01}",
         "{name: bn_reestimation, num_batches: 50}"],
    ),
    "freeze": ([], ["{name: oscillation_freezing, threshold_start: 0.1, threshold_final: 0.01}",
                    "{name: bn_reestimation, num_batches: 50}"]),  # the same methods on the default schedule
    "damp": ([], ["{name: oscillation_dampening, lambda_final: 0.1}"]),  # pull latent weights to their grid point
}  # fmt: skip


def ingredient_overrides(name: str) -> list[str]:
    """The overrides of ``a+b+...``: each part's, with the methods of all parts in one list."""
    overrides: list[str] = []
    methods: list[str] = []
    for part in name.split("+"):
        if part not in INGREDIENTS:
            raise SystemExit(f"unknown ingredient {part!r}: use one of {sorted(INGREDIENTS)} joined by '+'")
        o, m = INGREDIENTS[part]
        overrides += o
        methods += m
    return overrides + ([f"methods=[{', '.join(methods)}]"] if methods else [])


def one_run(
    model: str, bits: int, seed: int, ingredient: str, qat_epochs: float, args: argparse.Namespace
) -> dict[str, Any] | None:
    base = recipe_to_dict(load_recipe(RECIPE))
    overrides = [
        f"model.name={model}",
        f"seed={seed}",
        f"pretrain.epochs={args.float_epochs}",
        f"qat.epochs={qat_epochs}",
        f"quant.weight.bits={bits}",
        f"quant.act.bits={bits}",
        *LSQ_BASELINE,  # "base" is plain LSQ; the ingredients add to it
        *ingredient_overrides(ingredient),
        *args.set,
    ]
    recipe = recipe_from_dict(apply_overrides(base, overrides))
    tag = "" if ingredient == "base" else f"-{ingredient}"
    run_dir = RUNS_DIR / "bench-accuracy" / f"{model}-w{bits}a{bits}{tag}-e{qat_epochs:g}-seed{seed}"
    if args.table_only:  # the finished run's summary, whatever lowbit version wrote it (None: not run)
        f = run_dir / "summary.json"
        return json.loads(f.read_text()) if f.is_file() else None
    done = _finished(run_dir, recipe_to_dict(recipe))
    # the benchmark's own scratch directory: a run that did not finish, or another recipe's, is redone
    return done if done is not None else run(recipe, run_dir, progress=not args.no_progress, force=True)


def _finished(run_dir: Path, recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The summary of a finished run of the same recipe there (thread count aside), else None."""
    summary, config = run_dir / "summary.json", run_dir / "config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    try:  # read through the recipe parser: fields added since take their defaults
        old = recipe_to_dict(recipe_from_dict(yaml.safe_load(config.read_text())))
    except Exception:  # noqa: BLE001 - a config this lowbit cannot read is simply not reused
        return None
    if {**old, "threads": None} != {**recipe, "threads": None}:
        return None
    return json.loads(summary.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--ingredients", nargs="+", default=["base"], help=f"from {sorted(INGREDIENTS)}, joined by '+'")
    p.add_argument("--float-epochs", type=float, default=3)
    p.add_argument("--qat-epochs", nargs="+", type=float, default=[1])
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. qat.lr=0.01")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table-only", action="store_true", help="the table of the finished runs; run nothing")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    for ing in args.ingredients:
        ingredient_overrides(ing)  # fail on a typo before hours of training
    header = ["model", "bits", "ingredients", "QAT epochs", "FP32 %", "quant %", "Δ points (mean ± half-range)",
              "target", "met", "QAT s"]  # fmt: skip
    rows = []
    for model in args.models:
        for bits in args.bits:
            for epochs in args.qat_epochs:
                for ing in args.ingredients:
                    runs = [one_run(model, bits, seed, ing, epochs, args) for seed in args.seeds]
                    if any(r is None for r in runs):  # --table-only: a combination not (fully) run is left out
                        continue
                    fl = [r["float_metric"] for r in runs]
                    qa = [r["quant_metric"] for r in runs]
                    delta = [q - f for q, f in zip(qa, fl, strict=True)]
                    spread = (max(delta) - min(delta)) / 2 if len(delta) > 1 else 0.0
                    target = TARGETS.get(bits)
                    met = "–" if target is None else ("yes" if -statistics.mean(delta) <= target else "no")
                    rows.append([
                        model, f"W{bits}A{bits}", ing, f"{epochs:g}", f"{statistics.mean(fl):.2f}",
                        f"{statistics.mean(qa):.2f}", f"{statistics.mean(delta):+.2f} ± {spread:.2f}",
                        f"≥ -{target}" if target is not None else "–", met,
                        f"{statistics.mean(r['qat_seconds'] for r in runs):.0f}",
                    ])  # fmt: skip
                    print(markdown_table(header, rows), flush=True)
    text = (
        "# LSQ QAT accuracy vs float (Fashion-MNIST test set)\n\n"
        f"{datetime.date.today()} · {machine_line()} · seeds {args.seeds} · float {args.float_epochs} epochs "
        f"(cached), first/last layer 8 bit, extra overrides {args.set or 'none'}; quantized accuracy is the "
        "converted integer model's. QAT seconds are as logged by each run; runs that shared the cores with "
        "other jobs make them no timing (benchmarks/step_time.py measures speed)\n\n"
        f"`python benchmarks/accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"{markdown_table(header, rows)}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
