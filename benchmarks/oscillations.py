"""Oscillations in QAT on Fashion-MNIST / MobileNetV2: LSQ, + BN re-estimation, + dampening, + freezing.

Every run starts from the same pre-trained float checkpoint (``lowbit train``'s cache) and runs the same
QAT stage (epochs, lr, data order, seed) through ``lowbit.run.run``; only ``methods`` differ:

- LSQ:        oscillation_tracking (diagnostics only: it never changes training) + bn_reestimation
- dampening:  oscillation_dampening + bn_reestimation
- freezing:   oscillation_freezing + bn_reestimation

Accuracy is that of the integer model. Every run's final row holds the fake-quant accuracy before
BN re-estimation (equal to the integer model's, tested) and the integer model's after it, so the
"LSQ" and "LSQ + BN re-estimation" rows come from the same runs. The oscillating fraction is the share
of tracked (<= 4 bit) weights whose EMA flip frequency exceeds the reporting threshold at the end.

Step time is measured separately, side by side in one process (interleaved rounds, median): a
whole-run wall clock on a shared two-core machine is too noisy to compare methods by.

    .venv/bin/python benchmarks/oscillations.py [--bits 4 3] [--seeds 0 1] [--qat-epochs 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LSQ_BASELINE,
    RUNS_DIR,
    interleaved_median_times,
    machine_line,
    markdown_table,
    qat_step,
)

from lowbit.api import prepare  # noqa: E402
from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from lowbit.methods import build_methods  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.run import run  # noqa: E402
from lowbit.train import split_parameters  # noqa: E402
from lowbit.validate import apply_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "oscillations.md"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
KINDS = ("lsq", "dampening", "freezing")


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Label -> the oscillation method of that row (every run also re-estimates BN at the end)."""
    out: dict[str, dict[str, Any]] = {}
    m = {"momentum": args.momentum}
    if "lsq" in args.variants:
        out["LSQ"] = {"name": "oscillation_tracking", **m}
    if "dampening" in args.variants:
        for lam in args.dampen_lambda:
            out[f"+ dampening λ={lam:g}"] = {"name": "oscillation_dampening", "lambda_final": lam, **m}
    if "freezing" in args.variants:
        th = {"threshold_start": args.freeze_start, "threshold_final": args.freeze_final}
        label = f"+ freezing f_th={args.freeze_start:g}→{args.freeze_final:g}"
        out[label] = {"name": "oscillation_freezing", **th, **m}
    return out


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in label.replace("λ", "lambda")).strip("-")


def one_run(label: str, method: dict[str, Any], bits: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    base = recipe_to_dict(load_recipe(RECIPE))
    overrides = [
        f"seed={seed}",
        f"qat.epochs={args.qat_epochs}",
        f"quant.weight.bits={bits}",
        f"quant.act.bits={bits}",
        *LSQ_BASELINE,
        *args.set,
    ]
    d = apply_overrides(base, overrides)
    d["methods"] = [method, {"name": "bn_reestimation", "num_batches": 50}]
    recipe = recipe_from_dict(d)
    run_dir = RUNS_DIR / "bench-oscillations" / f"{_slug(label)}-w{bits}a{bits}-seed{seed}{args.tag}"
    summary = run(recipe, run_dir, progress=not args.no_progress)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last_qat = [r for r in rows if r["stage"] == "qat"][-1]
    final = [r for r in rows if r["stage"] == "final"][-1]
    osc = last_qat.get("oscillation", {})
    return {
        "before_bn": final["before_finish_accuracy"],
        "after_bn": final["test_accuracy"],
        "oscillating": osc.get("oscillating", float("nan")),
        "frozen": osc.get("frozen", float("nan")),
        "layers": osc.get("layers", {}),
        "float": summary["float_metric"],
        "qat_seconds": summary["qat_seconds"],
    }


def step_times(bits: int, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one QAT step (forward, method loss, backward, two optimizers, method step)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    recipe = load_recipe(RECIPE, [f"quant.weight.bits={bits}", f"quant.act.bits={bits}", *LSQ_BASELINE])
    steps = {}
    for label, method in {"LSQ without tracking": None, **variants(args)}.items():
        model = build_model(recipe.model.name, num_classes=10, **recipe.model.args)
        prepare(model, recipe.quant, calib=[x])
        methods = build_methods([method] if method else [], total_steps=100)
        for m in methods:
            m.attach(model)
            if hasattr(m, "t"):
                m.t = 100  # dampening at full weight (it is skipped while lambda is 0)
        w, q = split_parameters(model)
        opts = [torch.optim.SGD(w, lr=1e-3, momentum=0.9), torch.optim.Adam(q, lr=1e-5)]
        step = qat_step(model, x, y, opts, methods)

        steps[label] = step
    return interleaved_median_times(steps, warmup=5, repeats=args.time_repeats)


def _mean_spread(v: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    m = statistics.mean(v) * scale
    half = (max(v) - min(v)) / 2 * scale if len(v) > 1 else 0.0
    return f"{m:{fmt}} ± {half:{fmt}}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--qat-epochs", type=float, default=5)
    p.add_argument("--variants", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--momentum", type=float, default=0.01)
    p.add_argument("--dampen-lambda", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--freeze-start", type=float, default=0.1)
    p.add_argument("--freeze-final", type=float, default=0.01)
    p.add_argument("--tag", default="", help="suffix of the run directories (runs/bench-oscillations/)")
    p.add_argument("--time-repeats", type=int, default=30)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. qat.lr=0.01")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    acc_rows, layer_notes = [], []
    rows_of = variants(args)
    # step times first, on an idle machine, before the long runs
    times = {bits: step_times(bits, args) for bits in args.bits} if not args.skip_timing else {}
    for bits in args.bits:
        res = {label: [one_run(label, m, bits, s, args) for s in args.seeds] for label, m in rows_of.items()}
        t = times.get(bits)

        def add(label: str, runs: list[dict[str, Any]], key: str, timed: str, bits: int = bits, t=t) -> None:  # noqa: ANN001
            rel = f"{t[timed] / t['LSQ']:.2f}×" if t else "–"
            acc_rows.append(
                [
                    f"W{bits}A{bits}",
                    label,
                    _mean_spread([r[key] for r in runs]),
                    _mean_spread([r["oscillating"] for r in runs], 100, ".3f"),
                    _mean_spread([r["frozen"] for r in runs], 100, ".3f"),
                    rel,
                ]
            )

        for label, runs in res.items():
            add(label if label == "LSQ" else f"{label}, no BN re-est.", runs, "before_bn", label)
            add(f"{label} + BN re-estimation", runs, "after_bn", label)
        if "LSQ" in res:
            top = sorted(res["LSQ"][0]["layers"].items(), key=lambda kv: -kv[1]["oscillating"])[:5]
            layer_notes.append(
                f"W{bits}A{bits} LSQ seed {args.seeds[0]}, most oscillating layers: "
                + ", ".join(f"`{n}` {100 * v['oscillating']:.2f}% of {v['numel']}" for n, v in top)
            )
        if t:
            layer_notes.append(
                f"W{bits}A{bits} step time (median of {args.time_repeats} interleaved rounds, batch 128): "
                + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in t.items())
            )
        print(markdown_table(["bits", "method", "acc %", "oscillating %", "frozen %", "step time vs LSQ"], acc_rows))

    table = markdown_table(
        ["bits", "method", "accuracy % (mean ± half-range)", "oscillating weights % (end)", "frozen weights %",
         "step time vs LSQ"],
        acc_rows,
    )
    text = (
        "# Oscillations in QAT: MobileNetV2-style net, Fashion-MNIST test set\n\n"
        f"{datetime.date.today()} · {machine_line()} · seeds {args.seeds} · QAT {args.qat_epochs} epochs from the "
        f"cached float model · tracking momentum {args.momentum}, dampening λ from 0 to its "
        "final value and the freezing threshold both start after a 25% warm-up (cosine) · "
        f"extra overrides {args.set or 'none'}\n\n"
        f"`python benchmarks/oscillations.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"{table}\n\n" + "\n".join(f"- {n}" for n in layer_notes) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
