"""LR-QAT on SmolLM2-135M against its baselines: perplexity, peak training memory and time per step.

Rows (same tokens, steps, batch and sequence length for every trained row): FP32 (the float model),
FP32 fine-tuned (the float model trained like full QAT: how much of a gain is only domain adaptation),
RTN (round-to-nearest, no training), scales-only (PEQA-style), full QAT (LSQ on every targeted weight,
fp32 latent weights), QLoRA-style (float adapters outside the frozen RTN weights), LR-QAT (adapters
inside the integer grid, int8 fixed-point Φ0). Training text: the Shakespeare corpus minus its
held-out tail; perplexity (sliding windows of 512) on that held-out tail and on the King James Bible.

Each row runs in a fresh subprocess. Peak training memory is measured from the end of preparation to
the end of training, so it holds everything resident while training (weights or Φ0, embeddings,
adapters, gradients, optimizer state, activations), not the float model that preparation starts from:
on CUDA the caching allocator's own ``max_memory_allocated``; on CPU the kernel's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` after preparation, with glibc told to return freed
memory, so it is the process's real peak while training, including the ~0.4 GiB of torch and Python).
Caveat (DATA.md): SmolLM2-135M's linear weights were Q4_1 (asymmetric 4-bit in blocks of 32), so 4-bit
group-32 is artificially lossless here; the settings below avoid it. Its widths (576, 1536) have no
group of 128 (576 = 4.5 × 128), so the group settings use 64, the nearest size that divides them.
Rows: ``lrqat_int`` is LR-QAT with Φ0 stored as packed b-bit integers (the paper's lowest-memory φ).

    .venv/bin/python benchmarks/lrqat.py [--settings w4pc w3g64] [--steps 50] [--seq-len 256]
        [--batch-size 1] [--device cpu|cuda] [--block-checkpoint]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from common import machine_line, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lrqat.md"
SETTINGS = {  # name: (bits, granularity, group_size)
    "w4pc": (4, "channel", None),
    "w3pc": (3, "channel", None),
    "w3g64": (3, "group", 64),
    "w2g64": (2, "group", 64),
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


def _prepare(model: torch.nn.Module, row: str, bits: int, gran: str, gs: int | None, rank: int) -> None:
    """Quantize ``model`` for ``row`` and set which parameters train (``lowbit train``'s own preparation)."""
    from lowbit.llm_config import LLMConfig
    from lowbit.llm_train import prepare_llm
    from lowbit.methods.lrqat import prepare_lrqat

    if row in FLOAT_ROWS:
        for name, p in model.named_parameters():  # the same weights full QAT trains
            p.requires_grad_(row == "fp32_ft" and "_proj." in name)
    elif row == "qlora":  # a baseline only: it does not merge into integers, so recipes do not offer it
        prepare_lrqat(model, bits=bits, rank=rank, granularity=gran, group_size=gs, method="qlora")
    else:
        method = "lrqat" if row == "lrqat_int" else row
        phi = "int" if row == "lrqat_int" else "fixed_point8"
        prepare_llm(model, LLMConfig(method=method, bits=bits, granularity=gran, group_size=gs, rank=rank, phi=phi))


def _reset_cpu_peak() -> None:
    """Return freed heap to the OS, then make the kernel's peak RSS (VmHWM) restart from the current RSS."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _cpu_peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_row(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.data.text import load_corpus, sliding_window_perplexity, split_tokens, token_blocks, tokenize_corpus
    from lowbit.llm import load_smollm2, train_steps
    from lowbit.llm_train import enable_block_checkpointing

    torch.manual_seed(0)
    torch.set_float32_matmul_precision(args.matmul_precision)
    dev = torch.device(args.device)
    model, tok = load_smollm2()
    train_ids, held = split_tokens(tokenize_corpus(load_corpus("shakespeare"), tok))
    other = tokenize_corpus(load_corpus("kjv"), tok)
    bits, gran, gs = SETTINGS[args.setting]
    model.to(dev)
    t0 = time.perf_counter()
    _prepare(model, args.row, bits, gran, gs, args.rank)
    prep_s = time.perf_counter() - t0
    if args.block_checkpoint:
        enable_block_checkpointing(model)
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_cpu_peak()
        resident = _cpu_peak_mib()
    steps = args.steps if args.row in TRAINED else 0
    lr, scale_lr = LR.get(args.row, (0.0, 0.0))
    blocks = token_blocks(train_ids, args.seq_len)
    # the first steps (allocator warm-up, autotuning) are timed apart from the rest
    warm, marks = min(3, steps), []

    def mark(done: int) -> None:
        if done in (warm, steps):
            marks.append(time.perf_counter())

    t0 = time.perf_counter()
    losses = train_steps(
        model,
        blocks,
        steps,
        lr=lr,
        scale_lr=scale_lr,
        batch_size=args.batch_size,
        seed=0,
        progress=False,
        on_step=mark,
    )
    per_step = (marks[-1] - marks[0]) / (steps - warm) if steps > warm and len(marks) == 2 else 0.0
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _cpu_peak_mib()
    ppl = {
        name: sliding_window_perplexity(model, ids, window=512, max_windows=args.eval_windows, batch_size=8)
        for name, ids in (("heldout", held), ("other", other))
    }
    return {
        "row": args.row,
        "setting": args.setting,
        "ppl_heldout": ppl["heldout"],
        "ppl_other": ppl["other"],
        "peak_mib": peak if steps else None,
        "resident_mib": resident,
        "seconds_per_step": per_step,
        "prepare_s": prep_s,
        "train_s": time.perf_counter() - t0,
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _key(r: dict[str, Any]) -> tuple[str, str]:
    return (r["row"], "float" if r["row"] in FLOAT_ROWS else r["setting"])


def _estimate_mib(r: dict[str, Any], args: argparse.Namespace) -> str:
    """``lowbit.memory``'s prediction for the row's training step, to set beside the measured peak."""
    from lowbit.memory import CONFIGS, estimate_training_memory

    if r["row"] not in TRAINED:
        return "–"
    bits, gran, gs = SETTINGS[r["setting"]] if r["row"] != "fp32_ft" else (4, "channel", None)
    method = {"fp32_ft": "fp32", "lrqat_int": "lrqat"}.get(r["row"], r["row"])
    est = estimate_training_memory(
        CONFIGS["smollm2-135m"], method, bits=bits, rank=args.rank, granularity=gran, group_size=gs,
        phi="int" if r["row"] == "lrqat_int" else "fixed_point8", batch=args.batch_size, seq_len=args.seq_len,
        block_checkpointing=args.block_checkpoint, foreach=args.device.startswith("cuda"), loss_chunk=256,
        train_embeddings=False,
    )  # fmt: skip
    return f"{est['total'] / 2**20:,.0f}"


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
                f"{r['seconds_per_step']:.3f}" if r["seconds_per_step"] else "–",
                f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r["first_loss"] is not None else "–",
            ]
        )
    return markdown_table(
        [
            "setting",
            "method",
            "ppl Shakespeare held-out",
            "vs FP32",
            "ppl KJV (other corpus)",
            "vs FP32",
            "peak train MiB",
            "lowbit memory estimate MiB",
            "s / step",
            "train loss first → last 20",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["w4pc", "w3g64"], choices=list(SETTINGS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-checkpoint", action="store_true", help="gradient checkpointing of the decoder blocks")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"])
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--jsonl", type=Path, help="rows so far (default: next to --out); finished rows are skipped")
    p.add_argument("--table-only", action="store_true", help="rewrite the table from --jsonl, run nothing")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:  # child process: one row, JSON on the last line
        print(json.dumps(one_row(args)))
        return
    jsonl = args.jsonl or args.out.with_suffix(".jsonl")
    done = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    have = {_key(r) for r in done}
    for setting in [] if args.table_only else args.settings:
        for row in args.rows:
            probe = {"row": row, "setting": setting}
            if _key(probe) in have:
                continue
            cmd = [
                sys.executable,
                __file__,
                "--row",
                row,
                "--setting",
                setting,
                "--steps",
                str(args.steps),
                "--seq-len",
                str(args.seq_len),
                "--batch-size",
                str(args.batch_size),
                "--rank",
                str(args.rank),
                "--eval-windows",
                str(args.eval_windows),
                "--matmul-precision",
                args.matmul_precision,
                "--device",
                args.device,
            ]
            cmd += ["--block-checkpoint"] if args.block_checkpoint else []
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # big frees go back to the OS at once
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"row {row} {setting} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            done.append(r)
            have.add(_key(r))
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            with jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)
    order = {k: i for i, k in enumerate(ROWS)}
    results = sorted(done, key=lambda r: ("" if r["row"] in FLOAT_ROWS else r["setting"], order[r["row"]]))
    results.sort(key=lambda r: -1 if r["row"] in FLOAT_ROWS else list(SETTINGS).index(r["setting"]))
    if args.table_only and args.out.is_file():  # keep the measured run's header and notes, renew the table
        lines = args.out.read_text().splitlines()
        first = next(i for i, line in enumerate(lines) if line.startswith("|"))
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        text = "\n".join([*lines[:first], _table(results, args), *lines[last + 1 :]]) + "\n"
        args.out.write_text(text)
        print(text)
        return
    where = "CUDA allocator max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
    text = (
        f"# LR-QAT vs baselines on SmolLM2-135M-Instruct ({args.device})\n\n"
        f"{datetime.date.today()} · {machine_line()}"
        + (f" · {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else "")
        + f" · {args.steps} steps of {args.batch_size} × {args.seq_len} tokens from Shakespeare (train part), "
        f"rank {args.rank}, AdamW, 10 % warm-up then linear decay"
        + (", decoder-block gradient checkpointing" if args.block_checkpoint else "")
        + (f", fp32 matmul precision {args.matmul_precision!r}" if args.matmul_precision != "highest" else "")
        + f"; perplexity on {args.eval_windows} windows of 512\n\n"
        f"`python benchmarks/lrqat.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        f"{_table(results, args)}\n\n"
        f"Peak train memory: {where}, from the end of preparation to the end of training. s / step: mean after "
        "3 warm-up steps. Learning rates (weights or adapters / scales): "
        + ", ".join(f"{k} {a:g} / {b:g}" for k, (a, b) in LR.items())
        + ". Caveat: SmolLM2-135M's linear weights were Q4_1 (asymmetric 4-bit, blocks of 32 along the input), "
        "so 4-bit group-32 would be artificially lossless; these settings avoid it. Group size 64 stands in for "
        "128, which does not divide the model's width 576.\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
