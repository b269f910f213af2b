"""Accuracy of LSQ QAT against the float model: Fashion-MNIST, W8A8 / W4A4 / W3A3.

For each model and seed, the float model is trained once by ``lowbit train``'s own pipeline (cached
under ``runs/.cache``), then each bit width runs the same QAT stage from it (same epochs, lr, data
order) through ``lowbit.run.run``; the quantized accuracy is that of the converted integer model.
First conv and last linear stay at 8 bits (the usual LSQ setup). Targets: W8A8 within 0.1 points of
FP32, W4A4 within 0.3, W3A3 within 1.

    .venv/bin/python benchmarks/accuracy.py [--models mobilenetv2 resnet] [--bits 8 4 3] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS_DIR, machine_line, markdown_table  # noqa: E402

from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from lowbit.run import run  # noqa: E402
from lowbit.validate import apply_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy.md"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
TARGETS = {8: 0.1, 4: 0.3, 3: 1.0}


def one_run(model: str, bits: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    base = recipe_to_dict(load_recipe(RECIPE))
    overrides = [
        f"model.name={model}",
        f"seed={seed}",
        f"pretrain.epochs={args.float_epochs}",
        f"qat.epochs={args.qat_epochs}",
        f"quant.weight.bits={bits}",
        f"quant.act.bits={bits}",
        *args.set,
    ]
    recipe = recipe_from_dict(apply_overrides(base, overrides))
    run_dir = RUNS_DIR / "bench-accuracy" / f"{model}-w{bits}a{bits}-seed{seed}"
    return run(recipe, run_dir, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--float-epochs", type=float, default=3)
    p.add_argument("--qat-epochs", type=float, default=1)
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. qat.lr=0.01")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = []
    for model in args.models:
        for bits in args.bits:
            runs = [one_run(model, bits, seed, args) for seed in args.seeds]
            fl = [r["float_metric"] for r in runs]
            qa = [r["quant_metric"] for r in runs]
            delta = [q - f for q, f in zip(qa, fl, strict=True)]
            spread = (max(delta) - min(delta)) / 2 if len(delta) > 1 else 0.0
            target = TARGETS.get(bits)
            met = "–" if target is None else ("yes" if -statistics.mean(delta) <= target else "no")
            rows.append(
                [
                    model,
                    f"W{bits}A{bits}",
                    f"{statistics.mean(fl):.2f}",
                    f"{statistics.mean(qa):.2f}",
                    f"{statistics.mean(delta):+.2f} ± {spread:.2f}",
                    f"≥ -{target}" if target is not None else "–",
                    met,
                    f"{statistics.mean(r['qat_seconds'] for r in runs):.0f}",
                ]
            )
            print(markdown_table(["model", "bits", "FP32 %", "quant %", "Δ points", "target", "met", "QAT s"], rows))
    table = markdown_table(
        ["model", "bits", "FP32 acc %", "quantized acc % (integer model)", "Δ points (mean ± half-range)",
         "target", "met", "QAT seconds"],
        rows,
    )
    text = (
        "# LSQ QAT accuracy vs float (Fashion-MNIST test set)\n\n"
        f"{datetime.date.today()} · {machine_line()} · seeds {args.seeds} · float {args.float_epochs} epochs "
        f"(cached), QAT {args.qat_epochs} epochs, first/last layer 8 bit, extra overrides {args.set or 'none'}\n\n"
        f"`python benchmarks/accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
