"""LR-QAT on SmolLM2-135M against its baselines: perplexity, peak memory and time per step.

Rows (same tokens, steps, batch and sequence length for every trained row): FP32 (the float model),
RTN (round-to-nearest, no training), scales-only (PEQA-style), full QAT (LSQ on every targeted weight,
fp32 latent weights), QLoRA-style (float adapters outside the frozen RTN weights), LR-QAT (adapters
inside the integer grid, int8 fixed-point Φ0). Training text: the Shakespeare corpus minus its
held-out tail; perplexity (sliding windows of 512) on that held-out tail and on the King James Bible.

Each row runs in a fresh subprocess, so its peak RSS (``ru_maxrss``, whole process: weights, the
tokenized corpora, activations, optimizer) is its own. Caveat (DATA.md): SmolLM2-135M's linear weights
were Q4_1 (asymmetric 4-bit in blocks of 32), so 4-bit group-32 is artificially lossless here; the
settings below avoid it.

    .venv/bin/python benchmarks/lrqat.py [--settings w4pc w3g128] [--steps 50] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, markdown_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "lrqat.md"
SETTINGS = {  # name: (bits, granularity, group_size)
    "w4pc": (4, "channel", None),
    "w3pc": (3, "channel", None),
    "w3g128": (3, "group", 128),
    "w2g128": (2, "group", 128),
}
ROWS = ("fp32", "rtn", "scales_only", "full_qat", "qlora", "lrqat")


def _prepare(model: torch.nn.Module, row: str, bits: int, gran: str, gs: int | None, rank: int) -> float:
    """Quantize ``model`` for ``row``; returns the weight learning rate to train with (0: no training)."""
    import lowbit
    from lowbit.methods.lrqat import LLAMA_TARGETS, prepare_lrqat

    if row == "fp32":
        return 0.0
    if row == "full_qat":
        spec = lowbit.QuantSpec(bits=bits, granularity=gran, group_size=gs, init="lp")
        rules = [lowbit.Rule(match=t, weight=spec) for t in LLAMA_TARGETS]
        lowbit.prepare(model, lowbit.QuantConfig(weight=None, act=None, rules=rules))
        for name, p in model.named_parameters():  # the paper's LSQ baseline trains the quantized layers
            p.requires_grad_(any(k in name for k in ("_proj.", "weight_quantizer")))
        return 5e-5
    method = {"rtn": "lrqat", "lrqat": "lrqat", "scales_only": "scales_only", "qlora": "qlora"}[row]
    prepare_lrqat(model, bits=bits, rank=rank, granularity=gran, group_size=gs, method=method)
    return {"rtn": 0.0, "lrqat": 1e-3, "scales_only": 0.0, "qlora": 1e-3}[row]


def one_row(args: argparse.Namespace) -> dict[str, Any]:
    from lowbit.data.text import load_corpus, sliding_window_perplexity, split_tokens, token_blocks, tokenize_corpus
    from lowbit.llm import load_smollm2, train_steps

    torch.manual_seed(0)
    model, tok = load_smollm2()
    train_ids, held = split_tokens(tokenize_corpus(load_corpus("shakespeare"), tok))
    other = tokenize_corpus(load_corpus("kjv"), tok)
    bits, gran, gs = SETTINGS[args.setting]
    lr = _prepare(model, args.row, bits, gran, gs, args.rank)
    t0 = time.perf_counter()
    steps = args.steps if args.row not in ("fp32", "rtn") else 0
    scale_lr = 1e-4 if args.row == "scales_only" else 1e-5
    blocks = token_blocks(train_ids, args.seq_len)
    losses = train_steps(model, blocks, steps, lr=lr, scale_lr=scale_lr, batch_size=1, seed=0, progress=False)
    per_step = (time.perf_counter() - t0) / max(steps, 1) if steps else 0.0
    ppl = {
        name: sliding_window_perplexity(model, ids, window=512, max_windows=args.eval_windows)
        for name, ids in (("heldout", held), ("other", other))
    }
    return {
        "row": args.row, "setting": args.setting, "ppl_heldout": ppl["heldout"], "ppl_other": ppl["other"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds_per_step": per_step,
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["w4pc", "w3g128"], choices=list(SETTINGS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.row:  # child process: one row, JSON on the last line
        print(json.dumps(one_row(args)))
        return
    results = []
    for setting in args.settings:
        for row in args.rows:
            if row == "fp32" and setting != args.settings[0]:
                continue
            cmd = [sys.executable, __file__, "--row", row, "--setting", setting, "--steps", str(args.steps),
                   "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--eval-windows", str(args.eval_windows)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"row {row} {setting} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(json.dumps(r), flush=True)
    fp32 = next((r for r in results if r["row"] == "fp32"), None)
    rows = []
    for r in results:
        rel = f"{r['ppl_heldout'] / fp32['ppl_heldout']:.2f}×" if fp32 else "–"
        rows.append([
            "FP32" if r["row"] == "fp32" else r["setting"], r["row"], f"{r['ppl_heldout']:.2f}", rel,
            f"{r['ppl_other']:.2f}", f"{r['peak_rss_mib']:,.0f}",
            f"{r['seconds_per_step']:.2f}" if r["seconds_per_step"] else "–",
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f}" if r["first_loss"] is not None else "–",
        ])
    table = markdown_table(
        ["setting", "method", "ppl Shakespeare held-out", "vs FP32", "ppl KJV (other corpus)", "peak RSS MiB",
         "s / step", "train loss first → last"],
        rows,
    )
    text = (
        "# LR-QAT vs baselines on SmolLM2-135M-Instruct (CPU)\n\n"
        f"{datetime.date.today()} · {machine_line()} · {args.steps} steps of 1 × {args.seq_len} tokens from "
        f"Shakespeare (train part), rank {args.rank}, AdamW; perplexity on {args.eval_windows} windows of 512\n\n"
        f"`python benchmarks/lrqat.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n\n"
        "Caveat: SmolLM2-135M's linear weights were Q4_1 (asymmetric 4-bit, blocks of 32 along the input), "
        "so 4-bit group-32 would be artificially lossless; these settings avoid it. Peak RSS is the whole "
        "process (model, corpora, activations, optimizer).\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
