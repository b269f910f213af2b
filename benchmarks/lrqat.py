"""LR-QAT on SmolLM2-135M against its baselines: perplexity, peak training memory and time per step.

Rows (same tokens, steps, batch and sequence length for every trained row): FP32 (the float model),
FP32 fine-tuned (the float model trained like full QAT: how much of a gain is only domain adaptation),
RTN (round-to-nearest, no training), scales-only (PEQA-style), full QAT (LSQ on every targeted weight,
fp32 latent weights), QLoRA-style (float adapters outside the frozen RTN weights), LR-QAT (adapters
inside the integer grid, int8 fixed-point Φ0). Training text: the Shakespeare corpus minus its
held-out tail; perplexity (sliding windows of 512) on that held-out tail and on the King James Bible.
Rows: ``lrqat_int`` is LR-QAT with Φ0 stored as packed b-bit integers (the paper's lowest-memory φ).

Every row is one ``lowbit.run.run`` of a causal_lm ``Recipe`` (the defaults of ``lowbit train``,
``lowbit.config.TASK_DEFAULTS``, with the row's quant section and learning rates), in a fresh
subprocess, into a scratch run directory (``runs/benchmarks-lrqat/<setting>-<row>``, ``--runs``). The
perplexities come from the run's summary: the float model's (``float_metric``) for FP32, the integer
model's (``quant_metric``, after ``lowbit.convert``) for every other row. The layer kind is the quant
config's: ``lowrank: null`` gives ``QuantLinear`` (full QAT; with ``weight: null`` a float layer that
trains, FP32 fine-tuning), ``lowrank`` gives the LR-QAT layer (``rank: 0``: scales only;
``variant: qlora``: the QLoRA-style baseline); RTN is ``qat.steps: 0``.

Step time and peak training memory are taken inside the run's training loop by a probe registered as a
QAT method (``lowbit.methods.METHODS``; its ``step`` hook is called after each optimizer step, and its
``metrics`` hook writes the figures into the ``qat`` row of ``metrics.jsonl``; it adds no loss and
changes no parameter). Peak training memory runs from the end of the first training step to the end of
the last one, so it holds everything resident while training (weights or Φ0, embeddings, adapters,
gradients, optimizer state, activations) and not the float model, its evaluation or preparation: on
CUDA the caching allocator's own ``max_memory_allocated``; on CPU the kernel's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` with glibc told to return freed memory, so it is the
process's real peak while training, including the ~0.4 GiB of torch and Python). The peak of the whole
run (loading, preparation, evaluations, ``convert``) goes to the JSONL as ``run_peak_mib``. s / step: the
mean after the first min(3, steps − 1) steps; no evaluation or checkpoint falls inside it.
Caveat (DATA.md): SmolLM2-135M's linear weights were Q4_1 (asymmetric 4-bit in blocks of 32), so 4-bit
group-32 is artificially lossless here; the settings below avoid it. Its width 576 is 4.5 groups of 128:
the ``g128`` settings end each row of 576 inputs with a ragged group of 64 (``lowbit.quant.quantizer``).

    .venv/bin/python benchmarks/lrqat.py [--settings w4pc w3g64] [--steps 50] [--seq-len 256]
        [--batch-size 1] [--device cpu|cuda] [--block-checkpoint]
    # smoke run on a random tiny LLaMA (byte tokenizer), seconds per row:
    .venv/bin/python benchmarks/lrqat.py --model random-llama --steps 3 --batch-size 2 --seq-len 32 \\
        --eval-windows 2 --eval-window 128 --settings w4pc --out /tmp/lrqat_smoke.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS_DIR, machine_line, markdown_table  # noqa: E402
from lrqat_probe import Probe, memory_mib, reset_peak  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lrqat.md"
SETTINGS = {  # name: (bits, granularity, group_size); "a": asymmetric grid, "s": stretched, "-kd": + distillation
    "w4pc": (4, "channel", None),
    "w3pc": (3, "channel", None),
    "w3g64": (3, "group", 64),
    "w2g64": (2, "group", 64),
    "w2g64a": (2, "group", 64),
    "w2g64s": (2, "group", 64),
    "w2g64-kd": (2, "group", 64),
    "w2g64a-kd": (2, "group", 64),
    "w2g64s-kd": (2, "group", 64),
    "w2g128": (2, "group", 128),
    "w2g128a": (2, "group", 128),
    "w2g128s": (2, "group", 128),
}
ROWS = ("fp32", "fp32_ft", "rtn", "scales_only", "full_qat", "qlora", "lrqat", "lrqat_int")
FLOAT_ROWS = ("fp32", "fp32_ft")  # one per table, not per setting
TRAINED = ("fp32_ft", "scales_only", "full_qat", "qlora", "lrqat", "lrqat_int")
# learning rates (weights or adapters, scales): the paper's choices where it has one (METHODS.md §2.3)
LR = {
    "fp32_ft": (5e-5, 0.0),
    "full_qat": (5e-5, 1e-5),
    "scales_only": (0.0, 1e-4),
    "qlora": (1e-3, 0.0),
    "lrqat": (1e-3, 1e-5),
    "lrqat_int": (1e-3, 1e-5),
}
PROBE = "benchmark_probe"  # the QAT method name the probe is registered under (in the child process only)
MODEL_TITLES = {"smollm2": "SmolLM2-135M-Instruct", "random-llama": "a random LLaMA"}


# -- one row: a recipe through the runner --------------------------------------------------------------


def _setting(name: str) -> tuple[str, float | None]:
    """``SETTING`` or ``SETTING-slrX`` (the scale learning rate X for the trained rows, for the paper's search
    over it): the setting's name in ``SETTINGS`` and the scale learning rate, or None for ``LR``'s."""
    base, _, slr = name.partition("-slr")
    if base not in SETTINGS:
        raise argparse.ArgumentTypeError(f"{name!r}: use one of {sorted(SETTINGS)}, optionally with -slr<lr>")
    try:
        value = float(slr) if slr else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name!r}: the scale learning rate after -slr must be a number") from None
    if value is not None and not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{name!r}: the scale learning rate must be in [0, 1)")
    return base, value


def _setting_arg(name: str) -> str:
    _setting(name)
    return name


def row_recipe(row: str, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    """The recipe mapping of one row: causal_lm defaults, the row's quant section, steps and learning rates."""
    setting, scale_lr_override = _setting(setting)
    bits, gran, gs = SETTINGS[setting]
    grid = setting.split("-")[0][-1]  # "a": asymmetric (zero point frozen in LR-QAT), "s": stretched (ParetoQ)
    weight: dict[str, Any] | None = {"bits": bits, "granularity": gran, "group_size": gs, "init": "lp",
                                     "symmetric": grid != "a", "stretched": grid == "s"}  # fmt: skip
    lowrank: dict[str, Any] | None = {
        "rank": args.rank, "alpha": 1.0, "phi": "fixed_point8", "variant": "lrqat", "recompute": True,
    }  # fmt: skip
    if row in FLOAT_ROWS:  # float QuantLinear layers (no quantizer); only those train, as in full QAT
        weight = lowrank = None
    elif row in ("rtn", "full_qat"):
        lowrank = None
    elif row == "scales_only":
        lowrank = {**lowrank, "rank": 0}  # type: ignore[dict-item]
    elif row == "qlora":
        lowrank = {**lowrank, "variant": "qlora"}  # type: ignore[dict-item]
    elif row == "lrqat_int":
        lowrank = {**lowrank, "phi": "int"}  # type: ignore[dict-item]
    steps = args.steps if row in TRAINED else 0
    lr, scale_lr = LR.get(row, (0.0, 0.0))
    if scale_lr_override is not None and row in TRAINED and row != "fp32_ft":
        scale_lr = scale_lr_override
    return {
        "name": f"benchmark-lrqat-{setting}-{row}",
        "task": "causal_lm",
        "seed": 0,
        "device": args.device,
        "model": {"name": args.model, "args": args.model_args},
        "data": {"name": args.corpus, "batch_size": args.batch_size},
        "text": {
            "seq_len": args.seq_len,
            "other_corpus": args.other_corpus,
            "eval_windows": args.eval_windows,
            "eval_window": args.eval_window,
            "block_checkpoint": args.block_checkpoint,
        },  # fmt: skip
        "quant": {
            "weight": weight,
            "act": None,
            "lowrank": lowrank,
            "freeze_unquantized": True,
            "rules": [{"match": "lm_head", "skip": True}],
        },  # fmt: skip
        # evaluate only at the end, checkpoint only there: nothing but training steps in the timed span
        "qat": {"steps": steps, "lr": lr, "scale_lr": scale_lr, "eval_every": max(steps, 1)},
        "checkpoint_every": 0,
        "threads": args.threads,
        "methods": [{"name": PROBE, "device": args.device}]
        + ([{"name": "distill"}] if setting.endswith("-kd") and steps > 0 else []),
    }


def one_row(args: argparse.Namespace) -> dict[str, Any]:
    """Run one row (in this fresh process) and return its JSONL record."""
    from lowbit.config import recipe_from_dict
    from lowbit.methods import METHODS
    from lowbit.run import run

    METHODS[PROBE] = Probe
    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.matmul_precision)
    recipe = recipe_from_dict(row_recipe(args.row, args.setting, args))
    run_dir = args.runs / f"{'float' if args.row in FLOAT_ROWS else args.setting}-{args.row}"
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset_peak(dev)
    summary = run(recipe, run_dir, resume=False, progress=False)
    run_peak = max(memory_mib(dev)[1], Probe.last.peak_before if Probe.last else 0.0)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    qat = [r for r in rows if r.get("stage") == "qat"][-1]
    trained = summary["steps"] > 0
    ppl, other = (
        (summary["float_metric"], summary["float_other_perplexity"])
        if args.row == "fp32"
        else (summary["quant_metric"], summary["quant_other_perplexity"])
    )
    if not args.keep_runs:  # the scratch run's model and checkpoint (full QAT's: weights + AdamW state)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for f in ("model.safetensors",):
            (run_dir / f).unlink(missing_ok=True)
    return {
        "row": args.row,
        "setting": args.setting,
        "model": args.model,
        "ppl_heldout": ppl,
        "ppl_other": other,
        "ppl_heldout_fake_quant": summary["qat_metric"],  # before convert; equal to ppl_heldout up to rounding
        "ppl_heldout_direct": summary["direct_metric"],
        "peak_mib": qat.get("probe_peak_mib") if trained else None,
        "resident_mib": qat.get("probe_resident_mib"),
        "run_peak_mib": run_peak,
        "seconds_per_step": qat.get("probe_seconds_per_step") if trained else None,
        "runner_seconds_per_step": summary["seconds_per_step"],  # includes the final evaluation + checkpoint
        "train_s": summary["qat_seconds"],
        "run_s": summary["train_seconds"],
        "train_loss": qat.get("train_loss"),  # mean over the steps (evaluated only at the end)
        "trainable": summary["trainable_parameters"],
        "quant_bytes": summary["quant_bytes"],
        "run_dir": str(run_dir),
    }


# -- the table -----------------------------------------------------------------------------------------


def _key(r: dict[str, Any]) -> tuple[str, str]:
    return (r["row"], "float" if r["row"] in FLOAT_ROWS else r["setting"])


def _model_dims(args: argparse.Namespace) -> dict[str, Any] | None:
    """The model's config for ``lowbit.llm.memory`` (None when it cannot be known without loading it)."""
    from lowbit.llm.memory import CONFIGS, load_config
    from lowbit.llm.models import RANDOM_LLAMA

    if args.model == "smollm2":
        return CONFIGS["smollm2-135m"]
    if args.model == "random-llama":
        return {**RANDOM_LLAMA, **args.model_args}
    path = Path(args.model).expanduser() / "config.json"
    return load_config(str(path)) if path.is_file() else None


def _estimate_mib(r: dict[str, Any], args: argparse.Namespace) -> str:
    """``lowbit memory``'s prediction for the row's training step, to set beside the measured peak."""
    from lowbit.errors import ConfigError
    from lowbit.llm.memory import estimate_training_memory

    dims = _model_dims(args)
    if r["row"] not in TRAINED or dims is None:
        return "–"
    bits, gran, gs = SETTINGS[_setting(r["setting"])[0]] if r["row"] != "fp32_ft" else (4, "channel", None)
    method = {"fp32_ft": "fp32", "lrqat_int": "lrqat"}.get(r["row"], r["row"])
    try:
        est = estimate_training_memory(
            dims, method, bits=bits, rank=args.rank, granularity=gran, group_size=gs,
            phi="int" if r["row"] == "lrqat_int" else "fixed_point8", batch=args.batch_size, seq_len=args.seq_len,
            block_checkpointing=args.block_checkpoint, foreach=args.device.startswith("cuda"), loss_chunk=256,
            train_embeddings=False,
        )  # fmt: skip
    except ConfigError:
        return "–"
    return f"{est['total'] / 2**20:,.0f}"


def _loss_cell(r: dict[str, Any]) -> str:
    if r.get("first_loss") is not None:  # rows measured before the runner (first → mean of the last 20)
        return f"{r['first_loss']:.3f} → {r['last_loss']:.3f}"
    return f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "–"


def _table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    fp32 = next((r for r in results if r["row"] == "fp32"), None)
    rows = []
    for r in results:
        rel = f"{r['ppl_heldout'] / fp32['ppl_heldout']:.2f}×" if fp32 else "–"
        rel_o = f"{r['ppl_other'] / fp32['ppl_other']:.2f}×" if fp32 else "–"
        rows.append(
            [
                "float" if r["row"] in FLOAT_ROWS else r["setting"],
                r["row"],
                f"{r['ppl_heldout']:.2f}",
                rel,
                f"{r['ppl_other']:.2f}",
                rel_o,
                f"{r['peak_mib']:,.0f}" if r.get("peak_mib") else "–",
                _estimate_mib(r, args),
                f"{r['seconds_per_step']:.3f}" if r.get("seconds_per_step") else "–",
                _loss_cell(r),
            ]
        )
    old = any(r.get("first_loss") is not None for r in results)
    return markdown_table(
        [
            "setting",
            "method",
            "ppl Shakespeare held-out" if args.corpus == "shakespeare" else f"ppl {args.corpus} held-out",
            "vs FP32",
            f"ppl {'KJV' if args.other_corpus == 'kjv' else args.other_corpus} (other corpus)",
            "vs FP32",
            "peak train MiB",
            "lowbit memory estimate MiB",
            "s / step",
            "train loss first → last 20" if old else "train loss (mean of the steps)",
        ],
        rows,
    )


# -- driver ----------------------------------------------------------------------------------------------


def _mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text) if text else {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a mapping, e.g. '{{hidden_size: 64}}'")
    return value


def _child(args: argparse.Namespace, row: str, setting: str) -> dict[str, Any]:
    """One row in a fresh subprocess (clean memory figures); its JSON record is the last stdout line."""
    spec = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    spec.update(row=row, setting=setting)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # big frees go back to the OS at once
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"row {row} {setting} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["w4pc", "w3g64"], type=_setting_arg,
                   help=f"from {sorted(SETTINGS)}, each optionally with -slr<lr>: that scale learning rate")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-window", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--model", default="smollm2", help="smollm2, random-llama or a Hugging Face causal LM folder")
    p.add_argument("--model-args", type=_mapping, default={}, help="YAML mapping, e.g. for random-llama's LlamaConfig")
    p.add_argument("--corpus", default="shakespeare", help="training corpus: shakespeare, kjv or file:PATH")
    p.add_argument("--other-corpus", default="kjv", help="the corpus scored but never trained on")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's)")
    p.add_argument("--block-checkpoint", action="store_true", help="gradient checkpointing of the decoder blocks")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    p.add_argument("--runs", type=Path, default=RUNS_DIR / "benchmarks-lrqat", help="scratch run directories")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's model.safetensors and checkpoints")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--jsonl", type=Path, help="rows so far (default: next to --out); finished rows are skipped")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from --jsonl, run nothing")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # child process: one row, JSON on the last line
        spec = json.loads(args.child)
        child = argparse.Namespace(**{**spec, "runs": Path(spec["runs"])})
        print(json.dumps(one_row(child)))
        return
    jsonl = args.jsonl or args.out.with_suffix(".jsonl")
    done = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    have = {_key(r) for r in done}
    for setting in [] if args.table_only else args.settings:
        for row in args.rows:
            if _key({"row": row, "setting": setting}) in have:
                continue
            r = _child(args, row, setting)
            done.append(r)
            have.add(_key(r))
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    order = {k: i for i, k in enumerate(ROWS)}
    results = sorted(done, key=lambda r: ("" if r["row"] in FLOAT_ROWS else r["setting"], order[r["row"]]))
    names = list(SETTINGS)
    results.sort(
        key=lambda r: (-1, "") if r["row"] in FLOAT_ROWS else (names.index(_setting(r["setting"])[0]), r["setting"])
    )
    if args.table_only and args.out.is_file():  # keep the measured run's header and notes, renew the table
        lines = args.out.read_text().splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("|"))
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        text = "\n".join([*lines[:first], _table(results, args), *lines[last + 1 :]]) + "\n"
        args.out.write_text(text)
        print(text)
        return
    cuda = args.device.startswith("cuda")
    where = "CUDA allocator max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    title = MODEL_TITLES.get(args.model, args.model) + (f" {args.model_args}" if args.model_args else "")
    text = (
        f"# LR-QAT vs baselines on {title} ({args.device})\n\n"
        f"{datetime.date.today()} · {machine_line()}"
        + (f" · {torch.cuda.get_device_name()}" if cuda else "")
        + f" · {args.steps} steps of {args.batch_size} × {args.seq_len} tokens from {args.corpus} (train part), "
        f"rank {args.rank}, AdamW, 10 % warm-up then linear decay"
        + (", decoder-block gradient checkpointing" if args.block_checkpoint else "")
        + (f", fp32 matmul precision {args.matmul_precision!r}" if args.matmul_precision != "highest" else "")
        + f"; perplexity on {args.eval_windows} windows of {args.eval_window}\n\n"
        f"`python benchmarks/lrqat.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"{_table(results, args)}\n\n"
        "Each row is one `lowbit.run.run` of a causal_lm recipe (`lowbit train`'s defaults); perplexities are "
        "the integer model's after `lowbit.convert` (fp32: the float model's). "
        f"Peak train memory: {where}, from the end of the first training step to the end of the last (the run's "
        "own preparation and evaluations are outside it). s / step: mean after 3 warm-up steps (fewer when there "
        "are fewer steps). Train loss: mean over all steps. Learning rates (weights or adapters / scales): "
        + ", ".join(f"{k} {a:g} / {b:g}" for k, (a, b) in LR.items())
        + "."
        + (
            " Caveat: SmolLM2-135M's linear weights were Q4_1 (asymmetric 4-bit, blocks of 32 along the input), "
            "so 4-bit group-32 would be artificially lossless; these settings avoid it. Groups of 128 over the "
            "width 576 end with a ragged group of 64."
            if args.model == "smollm2"
            else ""
        )
        + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
