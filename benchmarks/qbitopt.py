"""QBitOpt on Fashion-MNIST: uniform LSQ against bit allocation at the same average weight bits.

Every run starts from the same cached float model and runs the same QAT stage (epochs, lr, data
order, seed) through ``lowbit.run.run``; rows differ only in ``methods``:

- uniform:    no method; every quantized weight at the budget's bits (first/last layers at 8 as always)
- one-shot:   ``qbitopt`` with ``init: sensitivity`` (Fisher traces of the pretrained model on 8 batches),
              ``tau: 0``: allocated once before QAT, never again (HAWQ-style)
- QBitOpt:    ``qbitopt`` from the uniform start, reallocated every ``tau`` steps until the last 20 %,
              with the relaxation or the MILP, FIT or Hutchinson sensitivities

The budget is the mean weight width over the allocated layers (pinned first/last layers are outside
it), so a uniform b-bit model and QBitOpt at an average of b have the same weight bytes. A fractional
budget has no uniform row. Step time (median of interleaved rounds, batch 128, in one process) compares a
training step with QBitOpt's gradient hooks and EMA against the plain step; an allocation's own cost
(solve + set_bits, and Hutchinson's probes) is timed separately and is paid once every ``tau`` steps.

    .venv/bin/python benchmarks/qbitopt.py [--models mobilenetv2 resnet] [--seeds 0 1] [--budgets 3 2.5]
    .venv/bin/python benchmarks/qbitopt.py --solvers-only      # solver times, 200 layers x 6 candidates
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    LSQ_BASELINE,
    RUNS_DIR,
    cpu_model,
    interleaved_median_times,
    machine_line,
    markdown_table,
    qat_step,
)

from lowbit.api import prepare  # noqa: E402
from lowbit.config import load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from lowbit.methods import attach_methods, build_methods, call_hooks  # noqa: E402
from lowbit.methods.qbitopt_solve import allocate_exact, allocate_relaxed, average_bits_budget  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.run import run  # noqa: E402
from lowbit.train import split_parameters  # noqa: E402
from lowbit.validate import apply_overrides  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "qbitopt.md"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
VARIANTS = ("uniform", "oneshot", "relaxed", "exact", "hutchinson")
LABELS = {
    "uniform": "uniform LSQ",
    "oneshot": "one-shot (pretrained Fisher, no reallocation)",
    "relaxed": "QBitOpt, relaxation, FIT",
    "exact": "QBitOpt, MILP, FIT",
    "hutchinson": "QBitOpt, relaxation, Hutchinson",
}


def method_of(variant: str, budget: float, tau: int) -> list[dict[str, Any]]:
    if variant == "uniform":
        return []
    q: dict[str, Any] = {"name": "qbitopt", "average_bits": budget, "tau": tau}
    if variant == "oneshot":
        q.update(init="sensitivity", tau=0)
    elif variant == "exact":
        q.update(solver="exact")
    elif variant == "hutchinson":
        q.update(sensitivity="hutchinson", probe_batches=4)
    return [q]


def recipe_for(model: str, variant: str, budget: float, seed: int, args: argparse.Namespace) -> Any:
    base = recipe_to_dict(load_recipe(RECIPE))
    bits = int(budget)  # uniform at the budget; QBitOpt starts there (or at floor(budget)) and allocates
    d = apply_overrides(base, [f"model.name={model}", f"seed={seed}", f"qat.epochs={args.qat_epochs}",
                               f"quant.weight.bits={bits}", f"quant.act.bits={args.act_bits}", *LSQ_BASELINE,
                               *args.set])  # fmt: skip
    d["methods"] = method_of(variant, budget, args.tau)
    d["name"] = f"qbitopt-{model}"
    return recipe_from_dict(d)


def one_run(model: str, variant: str, budget: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipe_for(model, variant, budget, seed, args)
    run_dir = RUNS_DIR / "bench-qbitopt" / f"{model}-{variant}-b{budget:g}-a{args.act_bits}-seed{seed}{args.tag}"
    summary = run(recipe, run_dir, progress=not args.no_progress, force=True)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    allocs = [a for r in rows if r["stage"] == "qat" for a in r.get("qbitopt", {}).get("allocations", [])]
    out = {
        "accuracy": summary["quant_metric"],
        "float": summary["float_metric"],
        "bytes": summary["quant_bytes"],
        "whole_mean_bits": summary["mean_weight_bits"],
        "free_mean_bits": allocs[-1]["used"] if allocs else float(budget),
        "met": all(a["met"] for a in allocs) if allocs else True,
        "allocations": len(allocs),
        "changed": sum(1 for a in allocs[1:] if a["changed"] > 0),
        "final_bits": allocs[-1]["bits"] if allocs else None,
    }
    print(f"{model} {variant} b{budget:g} seed {seed}: {out['accuracy']:.2f} %, free mean {out['free_mean_bits']:.3f}, "
          f"{out['changed']}/{max(out['allocations'] - 1, 0)} reallocations changed bits", flush=True)  # fmt: skip
    return out


def step_times(model_name: str, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of a QAT step, plain and with QBitOpt's hooks; and of one allocation per variant."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    recipe = load_recipe(RECIPE, [f"model.name={model_name}", "quant.weight.bits=3", f"quant.act.bits={args.act_bits}",
                                  *LSQ_BASELINE])  # fmt: skip
    steps, allocations = {}, {}
    for variant in ("uniform", "relaxed", "exact", "hutchinson"):
        torch.manual_seed(0)
        model = build_model(recipe.model.name, num_classes=10, **recipe.model.args)
        prepare(model, recipe.quant, calib=[x])
        spec = method_of(variant, 3.0, 10**9)  # no allocation inside the timed steps
        methods = build_methods(spec, total_steps=10**9)
        attach_methods(methods, model)

        def losses(s: int, model: nn.Module = model) -> Any:
            while True:
                yield nn.functional.cross_entropy(model(x), y)

        call_hooks(methods, "start", model, losses, 0)
        w, q = split_parameters(model)
        opts = [torch.optim.SGD(w, lr=1e-3, momentum=0.9), torch.optim.Adam(q, lr=1e-5)]
        step = qat_step(model, x, y, opts, methods)

        if variant in ("uniform", "relaxed"):
            steps["uniform" if variant == "uniform" else "QBitOpt"] = step
        if methods:
            m = methods[0]
            times = []
            for k in range(args.alloc_repeats):
                t0 = time.perf_counter()
                traces = m._hutchinson(k) if variant == "hutchinson" else m.fisher
                c = m._coefficients(traces)
                m._apply(m._solve(c), k, variant, c)
                times.append(time.perf_counter() - t0)
            allocations[variant] = statistics.median(times)
    return interleaved_median_times(steps, warmup=5, repeats=args.time_repeats), allocations


def solver_times(repeats: int = 20) -> dict[str, float]:
    """Median seconds of each solver on 200 random layers x 6 candidates, average-bits budget 3.5."""
    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {"relaxed": [], "exact": []}
    for _ in range(repeats):
        c = rng.lognormal(0.0, 2.0, 200)
        w = rng.integers(1_000, 2_000_000, 200).astype(float)
        f = np.zeros(200)
        budget = average_bits_budget(w, f, 3.5)
        for name, solve in (("relaxed", allocate_relaxed), ("exact", allocate_exact)):
            t0 = time.perf_counter()
            solve(c, w, f, budget)
            out[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def llm_rows(args: argparse.Namespace) -> str:
    """SmolLM2-135M LR-QAT at uniform 3-bit per-channel weights against QBitOpt at an average of 3 bits."""
    base = {"task": "causal_lm", "model": {"name": "smollm2"}, "data": {"name": "shakespeare", "batch_size": 1},
            "text": {"other_corpus": "kjv", "seq_len": 256, "eval_windows": 16},
            "quant": {"weight": {"bits": 3, "granularity": "channel", "init": "lp"}, "lowrank": {"rank": 32}},
            "qat": {"steps": args.llm_steps, "lr": 0.001, "scale_lr": 1e-5, "eval_every": args.llm_steps},
            "checkpoint_every": args.llm_steps}  # fmt: skip
    tau = max(args.llm_steps // 4, 1)
    rows = []
    qbitopt = {"name": "qbitopt", "average_bits": 3.0, "tau": tau, "pin_first_last": False}
    oneshot = {"name": "qbitopt", "average_bits": 3.0, "tau": 0, "init": "sensitivity", "pin_first_last": False}
    rows_of = [("uniform W3 per channel, LR-QAT", []),
               (f"QBitOpt average 3 bits (relaxation, FIT, tau {tau}), LR-QAT", [qbitopt])]
    if args.llm_oneshot:  # allocated once from the pretrained model's Fisher (8 batches), never again
        rows_of = [("one-shot average 3 bits (relaxation, FIT of the pretrained model), LR-QAT", [oneshot])]
    for label, methods in rows_of:
        recipe = recipe_from_dict({**base, "name": "qbitopt-smollm2", "methods": methods})
        kind = "uniform" if not methods else ("oneshot" if args.llm_oneshot else "qbitopt")
        run_dir = RUNS_DIR / "bench-qbitopt" / f"smollm2-{kind}{args.tag}"
        t0 = time.perf_counter()
        s = run(recipe, run_dir, progress=not args.no_progress, force=True)
        rows_ = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        allocs = [a for r in rows_ if r["stage"] == "qat" for a in r.get("qbitopt", {}).get("allocations", [])]
        widths = sorted(allocs[-1]["bits"].values()) if allocs else []
        spread = ", ".join(f"{b}: {widths.count(b)}" for b in sorted(set(widths))) if widths else "all 3"
        rows.append([label, f"{s['quant_metric']:.2f}", f"{s['quant_other_perplexity']:.2f}",
                     f"{s['mean_weight_bits']:.3f}", f"{s['quant_bytes']:,}", spread,
                     f"{s['seconds_per_step']:.2f}" if s.get("seconds_per_step") else "–",
                     f"{time.perf_counter() - t0:.0f}"])  # fmt: skip
        print(markdown_table(["row", "ppl", "ppl KJV", "mean bits", "bytes", "layers per width", "s/step", "s"], rows),
              flush=True)
        float_ppl, float_kjv = s["float_metric"], s["float_other_perplexity"]
    return (f"## SmolLM2-135M, LR-QAT rank 32, {args.llm_steps} steps of 1 × 256 tokens (Shakespeare), "
            f"float perplexity {float_ppl:.2f} (KJV {float_kjv:.2f})\n\n"
            + markdown_table(["setting", "perplexity Shakespeare held-out", "perplexity KJV", "mean weight bits",
                              "file bytes", "layers per width (end)", "s / step", "run seconds"], rows) + "\n")


def _mean_spread(v: list[float], fmt: str = ".2f") -> str:
    half = (max(v) - min(v)) / 2 if len(v) > 1 else 0.0
    return f"{statistics.mean(v):{fmt}} ± {half:{fmt}}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budgets", nargs="+", type=float, default=[3.0, 2.5])
    p.add_argument("--act-bits", type=int, default=4)
    p.add_argument("--qat-epochs", type=float, default=2)
    p.add_argument("--tau", type=int, default=250)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--time-repeats", type=int, default=30)
    p.add_argument("--alloc-repeats", type=int, default=5)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--solvers-only", action="store_true")
    p.add_argument("--llm", action="store_true", help="only the SmolLM2 LR-QAT rows (needs `make llm`)")
    p.add_argument("--llm-steps", type=int, default=100)
    p.add_argument("--llm-oneshot", action="store_true", help="with --llm: only the one-shot allocation row")
    p.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. qat.lr=0.01")
    p.add_argument("--tag", default="", help="suffix of the run directories (runs/bench-qbitopt/)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    solvers = solver_times()
    head = ["# QBitOpt: bit allocation during QAT against uniform LSQ, Fashion-MNIST test set", "",
            f"{datetime.date.today()} · {cpu_model()} · {machine_line()}", "",
            "Solvers on 200 random layers × 6 candidates (median of 20): relaxation "
            f"{1000 * solvers['relaxed']:.1f} ms, MILP (HiGHS) {1000 * solvers['exact']:.1f} ms.", ""]  # fmt: skip
    print("\n".join(head), flush=True)
    if args.solvers_only:
        return
    if args.llm:
        text = llm_rows(args)
        out = args.out.with_name(args.out.stem + ("_llm_oneshot.md" if args.llm_oneshot else "_llm.md"))
        title = "# QBitOpt on an LLM: SmolLM2-135M by LR-QAT, uniform against allocated weight bits"
        out.write_text("\n".join([title, *head[1:3]]) + f"\n`python benchmarks/qbitopt.py {' '.join(sys.argv[1:])}`\n\n"
                       + text)
        print(f"wrote {out}")
        return
    tables = []
    for model in args.models:
        times, allocs = step_times(model, args) if not args.skip_timing else ({}, {})
        body = []
        for budget in args.budgets:
            for variant in args.variants:
                if variant == "uniform" and not float(budget).is_integer():
                    continue  # a fractional average has no uniform model
                runs = [one_run(model, variant, budget, s, args) for s in args.seeds]
                step = f"{times['QBitOpt'] / times['uniform']:.2f}×" if times and variant != "uniform" else (
                    "1.00×" if times else "–")
                alloc = f"{1000 * allocs[variant]:.0f} ms" if variant in allocs else "–"
                body.append([f"{budget:g}", LABELS[variant], _mean_spread([r["accuracy"] for r in runs]),
                             _mean_spread([r["free_mean_bits"] for r in runs], ".3f"),
                             _mean_spread([r["whole_mean_bits"] for r in runs], ".3f"),
                             f"{statistics.mean(r['bytes'] for r in runs):,.0f}",
                             "yes" if all(r["met"] for r in runs) else "NO",
                             " / ".join(f"{r['changed']} of {max(r['allocations'] - 1, 0)}" for r in runs),
                             step, alloc])  # fmt: skip
                print(markdown_table(["avg bits", "method", "acc %", "free mean bits", "model mean bits",
                                      "bytes", "budget met", "reallocations that changed bits", "step time",
                                      "one allocation"], body), flush=True)  # fmt: skip
        float_acc = runs[0]["float"]
        timing = (f"step time medians (batch 128, {args.time_repeats} interleaved rounds): uniform "
                  f"{1000 * times['uniform']:.1f} ms, with QBitOpt's hooks {1000 * times['QBitOpt']:.1f} ms"
                  ) if times else "step time not measured"  # fmt: skip
        tables.append(f"## {model}, activations {args.act_bits} bits, float {float_acc:.2f} %\n\n" + markdown_table(
            ["avg weight bits", "method", "accuracy % (mean ± half-range)", "mean bits (allocated layers)",
             "mean bits (whole model)", "file bytes", "budget met (every allocation)",
             "reallocations that changed bits (per seed)", "step time vs uniform", "one allocation"], body)
            + f"\n\n- {timing}\n")  # fmt: skip
    cmd = "python benchmarks/qbitopt.py " + " ".join(argv if argv is not None else sys.argv[1:])
    setup = (f"Seeds {args.seeds}, QAT {args.qat_epochs:g} epochs from the cached float model, tau {args.tau}, "
             f"reallocation frozen for the last 20 %.\n\n`{cmd}`\n\n")
    text = "\n".join(head) + setup + "\n".join(tables)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
