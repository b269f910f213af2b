"""Resiliency under quantization (Sung, Shin, Hwang 2015): float, 3-bit and ternary weights, directly
quantized and retrained, over network size; the effective compression ratio (ECR).

Each sweep is a ``lowbit sweep`` (``lowbit.sweep.run_sweep``) of a shipped recipe, so a rerun skips the
finished cells and every float model is trained once per (size, seed) and cached under
``runs/sweeps/<sweep>/.cache/``; the 2- and 3-bit cells of one size and seed start from the same float
network. Weights: one L2-optimal step per layer (``methods: [resiliency]``), fixed during retraining;
2 bits = ternary (M = 3), 3 bits = M = 7. Signals (layer inputs): 8 bits, fixed scales.

- ``mlp-mnist10k-width``: the FFDNN (MLP, 2 hidden layers) over hidden width, MNIST-10k (8,000 / 2,000)
- ``mlp-mnist10k-depth``: the MLP with 1-4 hidden layers at widths 32 and 256, MNIST-10k
- ``mlp-fashion-width``: the MLP over hidden width, Fashion-MNIST (60,000 / 10,000)
- ``cnn-fashion-width``: a small ResNet (3 stages of one basic block) over the feature-map width of its
  first stage (w, 2w, 4w), Fashion-MNIST, trained on the first 20,000 training images (CPU budget)

The finding tested: the float - ternary accuracy gap after retraining shrinks as the network grows. For
every sweep and bit width (and each value of the other swept model key), a least-squares line through
the per-seed gaps against log2(parameters) gives the change of the gap per doubling of the network, its
standard error and a two-sided p-value; the table also shows the mean gap of the smallest and of the
largest network.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/resiliency.py [--seeds 0 1 2] [--cnn-seeds 0] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS_DIR, machine_line, markdown_table  # noqa: E402

from lowbit.sweep import parse_grid, run_sweep  # noqa: E402
from lowbit.sweep.results import aggregate, markdown_mean  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "resiliency.md"
WIDTHS = "[8,16,32,64,128,256,512,1024]"

# name -> (recipe, grid and fixed overrides, x-axis key, what it is)
SWEEPS: dict[str, tuple[str, list[str], str, str]] = {
    "mlp-mnist10k-width": (
        "resiliency-mlp-mnist10k",
        [f"model.args.width={WIDTHS}", "quant.weight.bits=[2,3,8]", "pretrain.epochs=15", "qat.epochs=5"],
        "model.args.width",
        "MLP, 2 hidden layers, MNIST-10k; float 15 epochs, retraining 5 epochs",
    ),
    "mlp-mnist10k-depth": (
        "resiliency-mlp-mnist10k",
        [
            "model.args.depth=[1,2,3,4]",
            "model.args.width=[32,256]",
            "quant.weight.bits=[2,3,8]",
            "pretrain.epochs=15",
            "qat.epochs=5",
        ],  # fmt: skip
        "model.args.depth",
        "MLP, 1-4 hidden layers of width 32 or 256, MNIST-10k; float 15 epochs, retraining 5 epochs",
    ),
    "mlp-fashion-width": (
        "resiliency-mlp-mnist10k",
        [
            "data.name=fashion_mnist",
            f"model.args.width={WIDTHS}",
            "quant.weight.bits=[2,3,8]",
            "pretrain.epochs=6",
            "qat.epochs=3",
        ],  # fmt: skip
        "model.args.width",
        "MLP, 2 hidden layers, Fashion-MNIST; float 6 epochs, retraining 3 epochs",
    ),
    "cnn-fashion-width": (
        "resiliency-cnn-fashion",
        [
            "model.args.width=[2,4,8,16]",
            "quant.weight.bits=[2,3,8]",
            "data.train_subset=20000",
            "pretrain.epochs=4",
            "qat.epochs=2",
        ],  # fmt: skip
        "model.args.width",
        "ResNet (stages w, 2w, 4w), Fashion-MNIST, 20,000 training images; float 4 epochs, retraining 2 epochs",
    ),
}


def _fit(label: str, points: list[tuple[int, float]]) -> list[str]:
    """One findings row: (parameters, gap) points -> smallest / largest mean gap and the slope per doubling."""
    fit = stats.linregress([math.log2(n) for n, _ in points], [g for _, g in points])
    sizes = sorted({n for n, _ in points})

    def pm(n: int) -> str:
        v = [g for m, g in points if m == n]
        return f"{statistics.fmean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else "")

    significant = fit.pvalue < 0.05
    verdict = "not significant" if not significant else ("yes" if fit.slope < 0 else "no (grows)")
    return [label, f"{sizes[0]:,} → {sizes[-1]:,}", pm(sizes[0]), pm(sizes[-1]),
            f"{fit.slope:+.3f} ± {fit.stderr:.3f}", f"{fit.pvalue:.2g}", verdict]  # fmt: skip


def trend(rows: list[dict[str, Any]], keys: list[str], x_key: str) -> list[list[str]]:
    """Per bit width (and value of the other model keys): the retrained gap against log2(parameters), to
    float and, for W2/W3, to the W8 cell of the same size and seed (the same retraining, 255 levels)."""
    others = [k for k in keys if k.startswith("model.") and k != x_key]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["weight_bits"], *(r[k] for k in others)), []).append(r)
    w8 = {(r["num_parameters"], r.get("seed"), *(r[k] for k in others)): r["quant_metric"] for r in rows
          if r["weight_bits"] == 8}  # fmt: skip
    out = []
    for gk, group in sorted(groups.items()):
        tag = "".join(f", {k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, gk[1:], strict=True))
        out.append(_fit(f"W{gk[0]}{tag}: float − W{gk[0]}", [
            (r["num_parameters"], r["float_metric"] - r["quant_metric"]) for r in group]))  # fmt: skip
        pairs = [(r["num_parameters"], w8.get((r["num_parameters"], r.get("seed"), *gk[1:]))) for r in group]
        if gk[0] < 8 and all(v is not None for _, v in pairs):
            out.append(_fit(f"W{gk[0]}{tag}: W8 − W{gk[0]}", [
                (n, v - r["quant_metric"]) for (n, v), r in zip(pairs, group, strict=True)]))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the MLP sweeps")
    ap.add_argument("--cnn-seeds", type=int, nargs="+", default=[0], help="seeds of the CNN sweep")
    ap.add_argument("--only", nargs="+", choices=list(SWEEPS), help="run only these sweeps")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every sweep, replacing the sweep's own "
                    "(e.g. qat.epochs=1 'model.args.width=[8,16]')")  # fmt: skip
    ap.add_argument("--runs", type=Path, default=RUNS_DIR, help="runs root (sweeps go to RUNS/sweeps/NAME)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="the markdown file (plots go beside it)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    plot_dir = args.out.parent / args.out.stem
    plot_dir.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python benchmarks/resiliency.py", *sys.argv[1:]])
    md = [
        "# Resiliency under quantization: float, 3-bit and ternary weights over network size",
        "",
        f"{datetime.date.today()} · {machine_line(1)} · `{cmd}`",
        "",
        "Weights: one L2-optimal step per layer (exact search, `methods: [resiliency]`), fixed while the latent "
        "float weights retrain through the STE; W2 = ternary {-1, 0, 1} (M = 3), W3 = M = 7 levels; every layer "
        "quantized, signals 8 bits. *Direct* = the L2-optimal quantization of the float network before any "
        "retraining (same batch-norm statistics); *retrained* = the exported integer model after retraining. "
        "W8 (255 levels, same method and retraining) is the control for the retraining itself: float − W8 shows "
        "what the extra epochs alone change, W8 − W2 the cost of ternary weights net of them. "
        "Accuracy in % on the test split (MNIST-10k: 2,000 images, 1 image = 0.05 points; Fashion-MNIST: 10,000). "
        "Mean ± standard deviation over seeds (each seed: its own float network, data order and retraining). "
        "ECR: the size of the float network that reaches the same error, read on the float error-versus-size "
        "curve of the same sweep and seed (interpolated in log size), divided by the quantized network's size "
        "(packed weights, scales and the batch-norm parameters that stay float); – = the quantized network is "
        "worse than the smallest or better than the best float network, so the curve has no match.",
        "",
    ]
    intro = len(md)
    findings: list[list[str]] = []
    for name in args.only or list(SWEEPS):
        recipe, grid, x_key, what = SWEEPS[name]
        seeds = args.cnn_seeds if name.startswith("cnn") else args.seeds
        replaced = {e.split("=", 1)[0] for e in args.extra}
        grid = [g for g in grid if g.split("=", 1)[0] not in replaced]
        items = [*grid, f"seed=[{','.join(map(str, seeds))}]", "threads=1", *args.extra]
        t0 = time.perf_counter()
        rows, out = run_sweep(ROOT / "recipes" / f"{recipe}.yaml", items, args.runs, name=name,
                              progress=not args.no_progress, x_key=x_key)  # fmt: skip
        wall = time.perf_counter() - t0
        grid_axes, _ = parse_grid(items)
        keys = [k for k, v in grid_axes.items() if len(v) > 1]
        agg = aggregate(rows, keys)
        trows = trend(rows, keys, x_key)
        findings += [[name, *r] for r in trows]
        for png in ("accuracy", "gap", "ecr", "memory"):
            shutil.copyfile(out / f"{png}.png", plot_dir / f"{name}_{png}.png")
        train_s = sum(r["train_seconds"] or 0 for r in rows)
        md += [
            f"## {name}: {what}" + (f" (overridden: {' '.join(args.extra)})" if args.extra else ""),
            "",
            f"`lowbit sweep recipes/{recipe}.yaml {' '.join(items)}` · {len(rows)} cells · the cells' recorded run "
            f"times add up to {train_s / 60:.1f} min (a cell whose float model came from the cache counts only its "
            f"own QAT; this invocation: {wall / 60:.1f} min, finished cells skipped)",
            "",
            markdown_mean(agg, keys),
            "",
            f"![accuracy]({plot_dir.name}/{name}_accuracy.png) ![gap]({plot_dir.name}/{name}_gap.png) "
            f"![ECR]({plot_dir.name}/{name}_ecr.png) ![accuracy against memory]({plot_dir.name}/{name}_memory.png)",
            "",
        ]
        print(f"{name}: {len(rows)} cells, {wall / 60:.1f} min", flush=True)
    head = ["sweep", "series: gap", "parameters", "gap smallest", "gap largest", "Δgap per doubling", "p", "shrinks?"]
    summary = [
        "## The finding: does the float − retrained gap shrink as the network grows?",
        "",
        "Least-squares line through every seed's gap (float − retrained, points) against log2(parameters); "
        "*shrinks?* says yes only for a negative slope with p < 0.05.",
        "",
        markdown_table(head, findings, "llrrrrrl"),
        "",
    ]
    md[intro:intro] = summary
    args.out.write_text("\n".join(md))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
