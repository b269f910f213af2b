"""The ``lowbit`` command.

    lowbit train RECIPE [key=value ...] [--resume] [--name NAME] [--runs DIR]
    lowbit eval RUN
    lowbit export RUN [--format lowbit|onnx] [--out PATH]
    lowbit generate MODEL "prompt" [--max-new-tokens N] [--tokenizer DIR]
    lowbit report RUN
    lowbit runs [--runs DIR]
    lowbit recipes
    lowbit memory [--config llama2-7b|llama2-13b|llama3.2-1b|smollm2-135m|PATH] [--method NAME|all]
                  [--batch N] [--seq-len N] [--bits B] [--rank R] [--phi PHI] [--group-size G]
                  [--dtype fp32|bf16] [--block-checkpointing] [--grad-accumulation] [--devices N] [--unit GiB|GB]

RECIPE is a YAML file or the name of a shipped recipe (``lowbit recipes`` lists them). Errors a user can
fix (bad keys or values, missing data, damaged checkpoints) print one line saying what and how, and exit
with status 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lowbit.config import load_recipe, recipe_from_dict
from lowbit.errors import ConfigError, FormatError, TrainingError
from lowbit.validate import read_yaml

__all__ = ["main", "find_recipe", "recipe_dirs"]

log = logging.getLogger("lowbit")


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: ``./recipes`` and the repository's ``recipes/`` beside ``src/``."""
    here = Path(__file__).resolve()
    dirs = [Path.cwd() / "recipes", here.parents[2] / "recipes"]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_recipe(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    for d in recipe_dirs():
        for cand in (d / name, d / f"{name}.yaml"):
            if cand.is_file():
                return cand
    known = sorted({f.stem for d in recipe_dirs() for f in d.glob("*.yaml")})
    raise ConfigError(f"recipe {name!r} not found: pass a YAML path or one of {', '.join(known) or '(none)'}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: use an integer from 1 to 100000")
    return value


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(w)}  {v}" for k, v in rows)


def _bits_label(weight: float, act: float) -> str:
    return f"W{weight:g}" + (f"A{act:g}" if act != 32 else "")


def _fmt_metric(metric: str, v: float) -> str:
    return f"{v:.2f}%" if metric == "accuracy" else f"{v:.2f}"


def _print_summary(s: dict, report: Path | None = None) -> None:
    metric = s["metric_name"]
    fm, dm, qm = s["float_metric"], s["direct_metric"], s["quant_metric"]
    ratio = s["float_bytes"] / max(s["quant_bytes"], 1)
    nominal = s.get("nominal_bits") or {"weight": s["weight_bits"], "act": s["act_bits"]}
    bits, used = _bits_label(nominal["weight"], nominal["act"]), _bits_label(s["weight_bits"], s["act_bits"])
    kind = f", low-rank {s['lowrank']['variant']} rank {s['lowrank']['rank']}" if s.get("lowrank") else ""
    kind = (f" ({used} as used: the mean over layers)" if used != bits else "") + kind
    # perplexity: lower is better, compared as a ratio
    change = ("change", f"{qm - fm:+.2f} points") if metric == "accuracy" else ("integer / float", f"{qm / fm:.2f}x")
    rows = [
        ("model / dataset", f"{s['model']} / {s['dataset']}"),
        ("quantization", bits + kind + (f", methods: {', '.join(s['methods'])}" if s["methods"] else "")),
        (f"float {metric}", _fmt_metric(metric, fm)),
        (f"{bits} {metric} before QAT (round-to-nearest)", _fmt_metric(metric, dm)),
        *(
            [(f"fake-quant {metric}, end of QAT (before finish steps)", _fmt_metric(metric, s["qat_metric"]))]
            if s.get("qat_metric") not in (None, qm)
            else []
        ),
        (f"{bits} {metric} (integer model)", _fmt_metric(metric, qm)),
        change,
        *(
            [(f"other corpus ({s.get('other_corpus')}): float -> integer",
              f"{s['float_other_perplexity']:.2f} -> {s['quant_other_perplexity']:.2f}")]
            if s.get("quant_other_perplexity") is not None
            else []
        ),  # fmt: skip
        ("trained", f"{s['steps']:,} steps, {s['trainable_parameters']:,} trainable parameters"),
        ("float size", f"{s['float_bytes']:,} bytes"),
        ("quantized size", f"{s['quant_bytes']:,} bytes ({ratio:.1f}x smaller)"),
        ("time", f"{s['train_seconds']:.0f} s (QAT {s['qat_seconds']:.0f} s)"),
        *([("report", str(report))] if report is not None else []),
    ]
    print(_table(rows))


def cmd_train(args: argparse.Namespace) -> int:
    from lowbit import distributed
    from lowbit.run import choose_threads, run, runs_child

    path = find_recipe(args.recipe)
    recipe = load_recipe(path, args.overrides)
    run_dir = runs_child(Path(args.runs), args.name or recipe.name, "--name" if args.name else "name (the recipe's)")
    if args.resume and args.force:
        raise ConfigError("--resume and --force contradict each other: --resume continues a run, --force starts over")
    world = distributed.init(recipe.device)  # under torchrun: one process of world.size
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
    where = f" on {world.size} processes" if world.size > 1 else ""
    if world.main:
        print(f"run {run_dir} (recipe {path}){where}")
    chosen = choose_threads(recipe)  # on a shared machine, fewer threads than cores beat waiting on busy ones
    if chosen:
        log.info("lowbit train: %s", chosen)
    try:
        summary = run(recipe, run_dir, resume=args.resume, progress=not args.no_progress, force=args.force,
                      fsdp=args.fsdp)  # fmt: skip
        distributed.barrier()  # every rank done with its collectives before any tears the process group down
    finally:
        distributed.shutdown()
    report = run_dir / "report.html"
    if world.main:
        _print_summary(summary, report if report.is_file() else None)
    return 0


def _load_run(run_arg: str):  # noqa: ANN202 - (run_dir, recipe, task, integer model) of a finished run
    from lowbit.export.io import load
    from lowbit.tasks import TASKS

    run_dir = Path(run_arg)
    cfg = run_dir / "config.yaml"
    if not cfg.is_file():
        raise ConfigError(f"run {str(run_dir)!r} has no config.yaml: pass a directory written by `lowbit train`")
    recipe = recipe_from_dict(read_yaml(cfg, f"run config {str(cfg)!r}"))
    path = run_dir / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"run {str(run_dir)!r} has no model.safetensors yet: finish it with `lowbit train --resume`")
    return run_dir, recipe, TASKS[recipe.task].for_run(recipe, run_dir), load(path)


def cmd_eval(args: argparse.Namespace) -> int:
    run_dir, recipe, task, model = _load_run(args.run)
    metric = task.metric_name
    numbers = {k.removeprefix("test_"): v for k, v in task.evaluate(model).items()}
    rows = [("run", str(run_dir)), (f"integer model {metric}", _fmt_metric(metric, numbers[metric]))]
    rows += [(f"integer model {k}", f"{v:.4f}") for k, v in numbers.items() if k != metric]
    summary_path = run_dir / "summary.json"
    recorded = json.loads(summary_path.read_text()).get("quant_metric") if summary_path.is_file() else None
    if recorded is not None:
        rows.append((f"{metric} recorded by the run", _fmt_metric(metric, recorded)))
    print(_table(rows))
    if args.json:
        print(json.dumps({"integer": numbers, "recorded": recorded}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.export.io import save

    default = {"onnx": "model.onnx", "gguf": "model.gguf"}.get(args.format, "model.safetensors")
    if args.out is not None and Path(args.out).is_dir():
        raise ConfigError(f"--out={args.out!r} is a folder: pass a file path, e.g. {Path(args.out) / default}")
    run_dir, recipe, task, int_model = _load_run(args.run)
    if args.format == "gguf":
        from lowbit.export.gguf import export_gguf
        from lowbit.llm.models import source_gguf

        out = export_gguf(int_model, Path(args.out or run_dir / default), name=recipe.name,
                          tokenizer_gguf=source_gguf(recipe.model.name), embeddings=args.embeddings,
                          round_scales=args.round_scales, ternary=args.ternary == "tq2_0")  # fmt: skip
    elif args.format == "onnx":
        from lowbit.export.onnx import export_onnx

        out = export_onnx(int_model, Path(args.out or run_dir / "model.onnx"), task.sample_input())
    elif args.out is None:
        out = run_dir / "model.safetensors"  # the run wrote it when it finished, and load() just checked it
    else:
        out = save(int_model, Path(args.out))
    print(_table([("exported", str(out)), ("size", f"{out.stat().st_size:,} bytes")]))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import os

    import torch

    from lowbit.export.io import load

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = Path(args.model)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = path / "model.safetensors"
    model = load(path)
    if not callable(getattr(model, "generate", None)):
        raise ConfigError(f"{str(path)!r} holds a {type(model).__name__}, not a Hugging Face causal LM")
    from lowbit.llm.models import CACHE

    tok_dir = (
        Path(args.tokenizer)
        if args.tokenizer
        else next((d for d in (folder / "tokenizer", folder, CACHE) if (d / "tokenizer_config.json").is_file()), None)
    )
    if tok_dir is None:
        raise ConfigError(f"no tokenizer found beside {str(path)!r}: pass --tokenizer DIR (a saved HF tokenizer)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    enc = tok(args.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lowbit.report import write_report

    print(write_report(Path(args.run)))
    return 0


def _number(s: dict, key: str) -> str:
    v = s.get(key)
    return f"{v:.2f}" if isinstance(v, int | float) and not isinstance(v, bool) else "–"


def cmd_runs(args: argparse.Namespace) -> int:
    """The runs under a runs folder, side by side: what each ran and what it reached."""
    root = Path(args.runs)
    if not root.is_dir():
        raise ConfigError(f"--runs={args.runs!r} is not a folder of runs (lowbit train writes them under runs/)")
    head = ["run", "model / data", "bits", "metric", "float", "before QAT", "integer", "size", "state"]
    rows = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file()):
        try:
            s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
        except (ValueError, RecursionError):
            s = {}
        if not isinstance(s, dict):
            s = {}

        ok = all(isinstance(s.get(k), int | float) for k in ("weight_bits", "act_bits"))
        bits = _bits_label(s["weight_bits"], s["act_bits"]) if ok else "–"
        size = f"{s['quant_bytes']:,}" if isinstance(s.get("quant_bytes"), int) else "–"
        state = "finished" if s else ("interrupted" if any((d / "checkpoints").glob("*.safetensors")) else "started")
        rows.append([d.name, f"{s.get('model', '?')} / {s.get('dataset', '?')}" if s else "–", bits,
                     str(s.get("metric_name", "–")), _number(s, "float_metric"), _number(s, "direct_metric"),
                     _number(s, "quant_metric"), size, state])  # fmt: skip
    if not rows:
        print(f"no runs under {root}")
        return 0
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    rows = []
    for d in recipe_dirs():
        for f in sorted(d.glob("*.yaml")):
            first = next((ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
            rows.append((f.stem, first))
    if not rows:
        print("no recipes found")
        return 0
    print(_table(rows))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from lowbit.llm.memory import METHODS, estimate_training_memory, load_config

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise ConfigError(f"--dtype={args.dtype!r} is not allowed: use one of {', '.join(dtypes)}")
    units = {"GiB": 2**30, "GB": 1e9}
    if args.unit not in units:
        raise ConfigError(f"--unit={args.unit!r} is not allowed: use GiB (2^30 bytes) or GB (10^9 bytes)")
    if args.method != "all" and args.method not in METHODS:
        raise ConfigError(f"--method={args.method!r} is not allowed: use all or one of {', '.join(METHODS)}")
    config = load_config(args.config)
    kw = dict(
        bits=args.bits, rank=args.rank, phi=args.phi, batch=args.batch, seq_len=args.seq_len,
        dtype=dtypes[args.dtype], block_checkpointing=args.block_checkpointing,
        grad_accumulation=args.grad_accumulation,
        granularity="channel" if args.group_size is None else "group", group_size=args.group_size,
        loss_chunk=args.loss_chunk or None, devices=args.devices,
    )  # fmt: skip
    fsdp = isinstance(args.devices, int) and args.devices > 1
    cols = ["frozen", "trainable", "gradients", "optimizer", "activations", "intermediate", "logits", "total"]
    rows = [["method", "frozen", "trainable", "grads", "AdamW", "activations", "Ŵ saved", "logits", "total (peak)"]]
    if fsdp:  # FSDP's gathered root and blocks; the total is one device's
        cols.insert(-1, "unsharded")
        rows[0][-1:] = ["FSDP gathered", "total (peak) per device"]
    for m in METHODS if args.method == "all" else [args.method]:
        est = estimate_training_memory(config, m, **kw)
        rows.append([m, *(f"{est[c] / units[args.unit]:.2f}" for c in cols)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    grid = "per channel" if args.group_size is None else f"per group of {args.group_size}"
    print(
        f"{args.config}: batch {args.batch} x seq {args.seq_len}, {args.dtype} weights, W{args.bits} {grid}, "
        f"rank {args.rank}, phi {args.phi}{', block checkpointing' if args.block_checkpointing else ''}"
        f"{', gradient accumulation' if args.grad_accumulation else ''}"
        f"{f', FSDP over {args.devices} devices ({args.unit} per device)' if fsdp else f' ({args.unit})'}"
    )
    for r in rows:
        print("  " + "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]))
    print("  total is the step's peak, not the row's sum: activations are freed as gradients arrive")
    if fsdp:
        print(
            f"  per device: weights, gradients and AdamW states are 1/{args.devices} shards (qlora's integers and "
            "cache whole),\n  activations are each device's own batch; FSDP gathered: the root (embeddings, head, "
            "final norm),\n  two blocks' parameters and gradients, unsharded while they run"
        )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from lowbit.sweep import run_sweep

    path = find_recipe(args.recipe)
    _, out = run_sweep(
        path, args.grid, args.runs, args.name, progress=not args.no_progress, x_key=args.x, max_cells=args.max_cells
    )
    print((out / "results.md").read_text())
    plots = sorted(p.name for p in out.glob("*.png"))
    where = f"; plots in {out}: {', '.join(plots)}" if plots else ""
    print(f"results: {out / 'results.csv'}, {out / 'results.md'}{where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lowbit import __version__
    from lowbit.sweep import MAX_CELLS

    p = argparse.ArgumentParser(prog="lowbit", description="Quantization-aware training to low-bit integer models")
    p.add_argument("-v", "--verbose", action="store_true", help="show debug logs")
    p.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a recipe: float pre-training (cached), calibration, QAT")
    t.add_argument("recipe", help="YAML file or shipped recipe name")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. qat.epochs=2 quant.weight.bits=3")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    t.add_argument("--force", action="store_true", help="start over in a run directory that holds a run (deletes it)")
    t.add_argument("--name", help="run name (default: the recipe's name)")
    t.add_argument("--runs", default="runs", help="root directory of runs (default: runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (causal LMs, no methods), not a copy per process")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate a finished run's integer model (model.safetensors)")
    e.add_argument("run", help="run directory, e.g. runs/default")
    e.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="export a finished run's integer model (lowbit file, ONNX QDQ, GGUF)")
    x.add_argument("run", help="run directory, e.g. runs/default")
    x.add_argument("--format", choices=["lowbit", "onnx", "gguf"], default="lowbit",
                   help="default: lowbit (safetensors); gguf: llama.cpp, for LLaMA-architecture LLM runs")  # fmt: skip
    x.add_argument("--out", help="output path (default: RUN/model.safetensors, RUN/model.onnx or RUN/model.gguf)")
    x.add_argument("--embeddings", choices=["f16", "f32", "q8_0", "q4_0", "q4_1"], default="f16",
                   help="gguf: a float token embedding's (and float head's) type, q* by round-to-nearest "
                        "(default f16); one trained on a grid (quant.embedding) is written from its blocks")
    x.add_argument("--ternary", choices=["tq2_0", "q4_0"], default="tq2_0",
                   help="gguf: ternary layers (rows of 256k) as TQ2_0, 2.06 bits a weight (default), or Q4_0")
    x.add_argument("--round-scales", action="store_true",
                   help="gguf: round float32-trained scales to float16 (else refused: the file would not be exact)")
    x.set_defaults(func=cmd_export)
    g = sub.add_parser("generate", help="generate text (greedy) with a saved integer LLM")
    g.add_argument("model", help="a model.safetensors written by lowbit.save, or the folder holding it")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=40, help="tokens to generate (default 40)")
    g.add_argument("--tokenizer", help="folder of a saved HF tokenizer (default: beside the model, else SmolLM2's)")
    g.set_defaults(func=cmd_generate)
    rp = sub.add_parser("report", help="write plots and a self-contained report.html for a run")
    rp.add_argument("run", help="run directory, e.g. runs/default")
    rp.set_defaults(func=cmd_report)
    rn = sub.add_parser("runs", help="list the runs under a runs folder side by side (metric, bits, size, state)")
    rn.add_argument("--runs", default="runs", help="root directory of runs (default: runs)")
    rn.set_defaults(func=cmd_runs)
    r = sub.add_parser("recipes", help="list shipped recipes")
    r.set_defaults(func=cmd_recipes)
    mm = sub.add_parser("memory", help="predict the peak training memory of LLM QAT methods (lrqat, full_qat, ...)")
    mm.add_argument(
        "--config", default="llama2-7b", help="llama2-7b, llama2-13b, llama3.2-1b, smollm2-135m or a config.json path"
    )
    mm.add_argument("--method", default="all", help="all (default), eval, fp32, full_qat, lrqat, scales_only, qlora")
    mm.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    mm.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    mm.add_argument("--bits", type=int, default=4, help="weight bits (default 4)")
    mm.add_argument("--rank", type=int, default=32, help="adapter rank of lrqat and qlora (default 32)")
    mm.add_argument("--phi", default="fixed_point8", help="storage of Φ0: fixed_point8 (default), bf16, fp32, int")
    mm.add_argument("--group-size", type=int, default=None, help="quantize per group of G inputs (default: channel)")
    mm.add_argument("--dtype", default="bf16", help="weights: bf16 (default, as the paper) or fp32")
    mm.add_argument("--block-checkpointing", action="store_true", help="recompute each decoder block in backward")
    mm.add_argument("--grad-accumulation", action="store_true", help="gradients stay alive across micro-batches")
    mm.add_argument(
        "--loss-chunk", type=int, default=256, help="tokens per chunk of the chunked loss (default 256); 0: full logits"
    )
    mm.add_argument(
        "--devices", type=int, default=1, help="FSDP2 over N devices, a unit per block (default 1: no FSDP); with "
        "N > 1 every figure is per device, --batch each device's own batch"
    )  # fmt: skip
    mm.add_argument("--unit", default="GiB", help="GiB (default, 2^30 bytes) or GB (10^9 bytes, the paper's)")
    mm.set_defaults(func=cmd_memory)
    sw = sub.add_parser("sweep", help="run a recipe over a grid of keys (resumable); write a CSV, a table and plots")
    sw.add_argument("recipe", help="YAML file or shipped recipe name")
    sw.add_argument("grid", nargs="+", help="key=[v1,v2,...] axes and key=value fixed overrides, "
                    "e.g. model.args.width=[64,256] quant.weight.bits=[2,3]")  # fmt: skip
    sw.add_argument("--name", help="sweep name (default: the recipe's name); cells go to RUNS/sweeps/NAME/")
    sw.add_argument("--runs", default="runs", help="root directory of runs (default: runs)")
    sw.add_argument("--x", help="swept model key for the plots' x axis, as parameter count (default: the first)")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.add_argument("--max-cells", type=int, default=MAX_CELLS, help=f"refuse a larger grid (default {MAX_CELLS})")
    sw.set_defaults(func=cmd_sweep)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `lowbit`: what it can do, not an error
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.func(args))
    except (ConfigError, FormatError, TrainingError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "the same `lowbit sweep` command" if args.command == "sweep" else "`lowbit train ... --resume`"
        print(f"lowbit {args.command}: interrupted; continue with {again} (finished work is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
