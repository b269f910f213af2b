"""Binary networks on Fashion-MNIST: latent-weight Adam vs Bop vs CEMA, with and without distillation.

Every run starts from the same cached float model of its architecture and runs the same QAT stage
(epochs, data order, seed; the non-binary parameters with Adam) through ``lowbit.run.run``; rows
differ only in the ``binary`` method's optimizer and in whether ``distill`` (the float model as
teacher) is added. Models: the Bi-Real/ReActNet-style CNN (``recipes/birealnet-binary.yaml``: binary
3×3 convolutions, weights and activations) and a binary MLP (hard-tanh hidden layers, binary weights
and activations, first and last layer 8-bit). The flip ratio is the share of binary weights that
changed sign per optimizer step, averaged over the first and the last evaluation window.

Then a sensitivity grid per optimizer (3 × 3 values of its two main hyperparameters, one seed, the CNN
without distillation): the spread of accuracy over the grid says how much tuning each one needs.
Step time (median of interleaved rounds, batch 128, in one process): a float step, and a binary step
under each optimizer.

    .venv/bin/python benchmarks/binary.py [--models birealnet mlp] [--seeds 0 1] [--qat-epochs 2] [--no-grid]
        [--device cuda --jobs 8]   # a GPU runs several of these small runs at once
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

from common import RUNS_DIR, cpu_model, interleaved_median_times, machine_line, markdown_table, qat_step  # noqa: E402

from lowbit.api import prepare  # noqa: E402
from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from lowbit.methods import attach_methods, build_methods, call_hooks  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.run import run  # noqa: E402
from lowbit.train import split_parameters  # noqa: E402
from lowbit.validate import apply_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "binary.md"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
OPTIMIZERS = ("adam", "bop", "cema", "cema-inertia")
# each optimizer's settings in the main table (the sensitivity grid varies its two main hyperparameters)
DEFAULTS = {"adam": {"lr": 1e-3}, "bop": {"threshold": 1e-6, "gamma": 1e-3}, "cema": {"alpha": 1e-3, "gamma": 1e-2},
            "cema-inertia": {"alpha": 1e-3, "gamma": 1e-2, "inertia": 1e-2}}
GRID = {
    "adam": {"lr": [1e-4, 1e-3, 1e-2], "clip": [0.5, 1.0, 2.0]},
    "bop": {"threshold": [1e-8, 1e-6, 1e-4], "gamma": [1e-4, 1e-3, 1e-2]},
    "cema": {"alpha": [1e-4, 1e-3, 1e-2], "gamma": [1e-3, 1e-2, 1e-1]},
}
MLP = {"model": {"name": "mlp", "args": {"width": 256, "depth": 2, "act": "hardtanh"}}, "name": "binary-mlp"}


def base_recipe(model: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    d = recipe_to_dict(load_recipe(RECIPES / "birealnet-binary.yaml"))
    if model == "mlp":
        d = {**d, **MLP, "quant": {**d["quant"], "rules": []}}
    return apply_overrides(d, [f"seed={seed}", f"qat.epochs={args.qat_epochs}", *args.set])


def one_run(model: str, optimizer: str, kd: bool, seed: int, hp: dict[str, float], args: argparse.Namespace,
            tag: str = "") -> dict[str, Any]:  # fmt: skip
    d = base_recipe(model, seed, args)
    binary = {"name": "binary", "optimizer": optimizer.split("-")[0], **hp}
    d["methods"] = [binary] + ([{"name": "distill", "weight": args.kd_weight}] if kd else [])
    label = f"{model}-{optimizer}{'-kd' if kd else ''}-seed{seed}{tag}{args.tag}"
    run_dir = RUNS_DIR / "bench-binary" / label
    recipe = recipe_from_dict(d)
    if args.reuse and _finished_same(run_dir, recipe):
        summary = json.loads((run_dir / "summary.json").read_text())
        print(f"{label}: reusing the finished run in {run_dir}", flush=True)
    else:
        summary = run(recipe, run_dir, progress=not args.no_progress, force=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    qat = [r for r in rows if r["stage"] == "qat"]
    out = {"accuracy": summary["quant_metric"], "float": summary["float_metric"],
           "flip_start": qat[0]["flip_ratio"], "flip_end": qat[-1]["flip_ratio"]}  # fmt: skip
    print(f"{label} {hp}: {out['accuracy']:.2f} % (float {out['float']:.2f})", flush=True)
    return out


def _finished_same(run_dir: Path, recipe: Any) -> bool:
    """True when ``run_dir`` holds a finished run of exactly this recipe (its resolved config.yaml equal)."""
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    return load_recipe(run_dir / "config.yaml") == recipe


def step_times(model_name: str, args: argparse.Namespace) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    recipe = recipe_from_dict(base_recipe(model_name, 0, args))
    steps = {}
    for label in ("float", *OPTIMIZERS):
        torch.manual_seed(0)
        model = build_model(recipe.model.name, num_classes=10, **recipe.model.args)
        methods = []
        if label != "float":
            prepare(model, recipe.quant, calib=[x])
            spec = {"name": "binary", "optimizer": label.split("-")[0], **DEFAULTS[label]}
            methods = build_methods([spec], total_steps=10**6)
            attach_methods(methods, model)
        own = [g for groups in call_hooks(methods, "param_groups", model) for g in groups]
        owned = {id(p) for gr in own for p in gr["params"]}
        w, q = (list(filter(lambda p: id(p) not in owned, ps)) for ps in split_parameters(model))
        opts = [torch.optim.Adam(w + q, lr=1e-3)]
        opts += [gr["optimizer"]([{k: v for k, v in gr.items() if k not in ("optimizer", "schedule")}]) for gr in own]
        step = qat_step(model, x, y, opts, methods)

        steps[label] = step
    return interleaved_median_times(steps, warmup=3, repeats=args.time_repeats)


def _ms(v: list[float], scale: float = 1.0, fmt: str = ".2f") -> str:
    half = (max(v) - min(v)) / 2 if len(v) > 1 else 0.0
    return f"{statistics.mean(v) * scale:{fmt}} ± {half * scale:{fmt}}"


def _pool_run(job: tuple[Any, ...]) -> dict[str, Any]:
    model, opt, kd, seed, hp, args, tag = job
    torch.set_num_threads(args.threads_per_job)
    return one_run(model, opt, kd, seed, hp, args, tag=tag)


def run_all(jobs: list[tuple[Any, ...]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run, in order, or ``args.jobs`` at a time in spawned processes (a GPU holds several small runs)."""
    if args.jobs <= 1:
        return [one_run(m, o, kd, s, hp, args, tag=t) for m, o, kd, s, hp, t in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_pool_run, [(m, o, kd, s, hp, args, t) for m, o, kd, s, hp, t in jobs]))


def device_line(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} (device {device})"
    return cpu_model()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["birealnet", "mlp"], choices=["birealnet", "mlp"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--qat-epochs", type=float, default=2)
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--no-kd", action="store_true", help="leave out the rows with distillation")
    p.add_argument("--kd-only", action="store_true", help="only the rows with distillation")
    p.add_argument("--kd-weight", type=float, default=1.0, help="the distill method's weight (large: ReActNet's loss)")
    p.add_argument("--no-grid", action="store_true")
    p.add_argument("--grid-only", action="store_true", help="only the sensitivity grid")
    p.add_argument("--time-repeats", type=int, default=20)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--device", default="cpu", help="the runs' device (cpu, cuda, cuda:N)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    p.add_argument("--threads-per-job", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. qat.lr=0.01")
    p.add_argument("--tag", default="")
    p.add_argument("--reuse", action="store_true", help="reuse a finished run whose config.yaml equals the recipe")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.set = [*args.set, f"device={args.device}"]
    kd_rows = (False,) if args.no_kd else (True,) if args.kd_only else (False, True)
    jobs = [] if args.grid_only else [
        (model, opt, kd, s, DEFAULTS[opt], "") for model in args.models for opt in args.optimizers
        for kd in kd_rows for s in args.seeds]  # fmt: skip
    grid_opts = [] if args.no_grid else [o for o in args.optimizers if o in GRID]
    for opt in grid_opts:
        (k1, v1), (k2, v2) = GRID[opt].items()
        jobs += [(args.models[0], opt, False, args.seeds[0], {**DEFAULTS[opt], k1: a, k2: b},
                  f"-grid-{k1}{a:g}-{k2}{b:g}") for a in v1 for b in v2]  # fmt: skip
    done = iter(run_all(jobs, args))  # the results in job order, taken by the tables below

    timing_on = "timings not measured" if args.skip_timing else f"timings on {cpu_model()}"
    head = ["# Binary networks: Adam on latent weights vs Bop vs CEMA, Fashion-MNIST test set", "",
            f"{datetime.date.today()} · runs on {device_line(args.device)} · {timing_on} · "
            f"{machine_line()} · {args.jobs} run(s) at a time", "",
            f"Seeds {args.seeds}, QAT {args.qat_epochs:g} epochs from the cached float model; the non-binary "
            "parameters with Adam (lr 1e-3, cosine) in every row; binary optimizers at their defaults "
            f"{DEFAULTS}; distillation weight {args.kd_weight:g}.", "",
            f"`python benchmarks/binary.py {' '.join(argv if argv is not None else sys.argv[1:])}`", ""]  # fmt: skip
    parts = []
    for model in [] if args.grid_only else args.models:
        times = step_times(model, args) if not args.skip_timing else {}
        body = []
        for opt in args.optimizers:
            for kd in kd_rows:
                runs = [next(done) for _ in args.seeds]
                acc = [r["accuracy"] for r in runs]
                gap = [r["float"] - r["accuracy"] for r in runs]
                step = f"{times[opt] / times['float']:.2f}×" if times else "–"
                body.append([opt + (" + distill" if kd else ""), _ms(acc), _ms(gap),
                             _ms([r["flip_start"] for r in runs], 100, ".3f"),
                             _ms([r["flip_end"] for r in runs], 100, ".4f"), step])  # fmt: skip
        timing = ("step medians (batch 128): " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in times.items())
                  ) if times else "step time not measured"  # fmt: skip
        parts.append(f"## {model}, float {runs[0]['float']:.2f} %\n\n" + markdown_table(
            ["binary optimizer", "accuracy % (mean ± half-range)", "gap to float (points)",
             "flip ratio, first eval window %", "flip ratio, last window %", "step time vs float"], body)
            + f"\n\n- {timing}\n")  # fmt: skip
    grid_rows = []
    for opt in grid_opts:
        (k1, v1), (k2, v2) = GRID[opt].items()
        accs = [next(done)["accuracy"] for _ in range(len(v1) * len(v2))]
        grid_rows.append([opt, f"{k1} ∈ {v1}, {k2} ∈ {v2}", f"{max(accs):.2f}", f"{min(accs):.2f}",
                          f"{max(accs) - min(accs):.2f}", f"{statistics.pstdev(accs):.2f}",
                          " ".join(f"{a:.1f}" for a in accs)])  # fmt: skip
    if grid_rows:
        parts.append(f"## Sensitivity: {args.models[0]}, seed {args.seeds[0]}, no distillation, 3 × 3 grid\n\n"
                     + markdown_table(["optimizer", "grid", "best %", "worst %", "spread (points)", "std",
                                       "accuracies (row-major)"], grid_rows) + "\n")  # fmt: skip
    text = "\n".join(head) + "\n" + "\n".join(parts)
    print(text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
