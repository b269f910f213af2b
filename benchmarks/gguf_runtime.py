"""SmolLM2-135M in llama.cpp (llama-cpp-python): float, round-to-nearest Q4_0 / Q4_1, and lowbit's LR-QAT
trained on the Q4_0 grid and written block-exactly, on held-out Shakespeare and on KJV.

Every file is written by ``lowbit.export.gguf.export_gguf`` from the same float model (``float_linears``:
``f16``; ``q4_0`` / ``q4_1`` round each block to nearest with gguf's reference quantizer, as
``llama-quantize`` would) or from the LR-QAT run's integer model (``recipes/smollm2-lrqat-q4_0.yaml``,
trained first if ``runs/bench-gguf/smollm2-lrqat-q4_0`` does not hold it). Embeddings are F16 in the first
rows, so they differ only in the decoder's linears; ``--embedding-rows`` adds files whose token embedding
(and so the tied head) is Q8_0 / Q4_0 by round-to-nearest, or Q4_0 with learned scales
(``recipes/smollm2-lrqat-q4_0-emb.yaml``, a second run). Perplexity: exp of the mean next-token NLL over the
first ``--windows`` non-overlapping windows of ``--seq`` tokens of each corpus (the run's tokenizer; the
token ids are fed to llama.cpp directly), from llama.cpp's logits, and for lowbit's own integer model
(torch) on the same windows. Tokens/s: llama.cpp's prompt processing of those windows (batch = window),
on this machine's threads; only meaningful on a quiet machine.

    .venv/bin/python benchmarks/gguf_runtime.py [--windows 16] [--seq 256] [--threads 2] [--embedding-rows]

(Not benchmarks/gguf.py: a script of that name would shadow the gguf package for everything it imports.)
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS_DIR, cpu_model, machine_line, markdown_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit.config import load_recipe  # noqa: E402
from lowbit.export.gguf import export_gguf  # noqa: E402
from lowbit.llm.models import load_causal_lm, source_gguf  # noqa: E402
from lowbit.tasks.text import TextTask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gguf.md"
RUN = RUNS_DIR / "bench-gguf" / "smollm2-lrqat-q4_0"
RUN_EMB = RUNS_DIR / "bench-gguf" / "smollm2-lrqat-q4_0-emb"
RUN_KD = RUNS_DIR / "bench-gguf" / "smollm2-lrqat-q4_0-distill"


def windows(ids: torch.Tensor, n: int, seq: int) -> list[list[int]]:
    return [ids[i * seq : (i + 1) * seq].tolist() for i in range(min(n, len(ids) // seq))]


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    lp = torch.log_softmax(torch.from_numpy(np.asarray(logits[:-1], dtype=np.float64)), dim=1)
    return float(-lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum()), len(ids) - 1


def torch_ppl(model: torch.nn.Module, wins: list[list[int]]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            s, c = _nll(model(torch.tensor([w])).logits[0].float().numpy(), w)
            total, count = total + s, count + c
    return math.exp(total / count)


def llama_ppl(path: Path, wins: list[list[int]], threads: int) -> tuple[float, float]:
    """(perplexity, prompt tokens per second) in llama.cpp."""
    from llama_cpp import Llama

    seq = max(len(w) for w in wins)
    llm = Llama(model_path=str(path), logits_all=True, n_ctx=seq, n_batch=seq, n_threads=threads,
                n_threads_batch=threads, verbose=False)  # fmt: skip
    total, count, seconds = 0.0, 0, 0.0
    for w in wins:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(w)
        seconds += time.perf_counter() - t0
        s, c = _nll(np.asarray(llm.scores[: len(w)]), w)
        total, count = total + s, count + c
    return math.exp(total / count), sum(len(w) for w in wins) / seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embedding-rows", action="store_true",
                   help="add files whose token embedding is Q8_0 / Q4_0 (round-to-nearest, or trained: a second run)")
    p.add_argument("--distill-row", action="store_true",
                   help="add LR-QAT with distillation (recipes/smollm2-lrqat-q4_0-distill.yaml; trained if missing)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    recipe = load_recipe(ROOT / "recipes" / "smollm2-lrqat-q4_0.yaml")
    runs = (RUN, *((RUN_EMB,) if args.embedding_rows else ()), *((RUN_KD,) if args.distill_row else ()))
    for run in runs:
        if not (run / "summary.json").is_file():
            subprocess.run([sys.executable, "-m", "lowbit", "train", run.name, "--runs", str(run.parent),
                            "--no-progress", *(["--resume"] if run.exists() else [])], check=True)  # fmt: skip
    task = TextTask.for_run(recipe, RUN)
    assert task.other is not None
    corpora = {"Shakespeare (held out)": windows(task.held, args.windows, args.seq),
               "KJV": windows(task.other, args.windows, args.seq)}  # fmt: skip
    folder = RUNS_DIR / "bench-gguf" / "files"
    tok = source_gguf("smollm2")
    float_model, _ = load_causal_lm("smollm2", {}, recipe.seed)
    int_model = lowbit.load(RUN / "model.safetensors").eval()
    files = {
        "float (F16)": export_gguf(float_model.eval(), folder / "f16.gguf", tokenizer_gguf=tok, float_linears="f16"),
        "round-to-nearest Q4_0 (gguf reference)": export_gguf(float_model, folder / "rtn-q4_0.gguf",
                                                               tokenizer_gguf=tok, float_linears="q4_0"),
        "round-to-nearest Q4_1 (gguf reference)": export_gguf(float_model, folder / "rtn-q4_1.gguf",
                                                               tokenizer_gguf=tok, float_linears="q4_1"),
        "lowbit LR-QAT on Q4_0, block-exact": export_gguf(int_model, folder / "lowbit-q4_0.gguf", tokenizer_gguf=tok),
    }  # fmt: skip
    if args.distill_row:  # the same LR-QAT with distillation from the float model (the KJV gap)
        files["lowbit LR-QAT on Q4_0 + distillation (smollm2-lrqat-q4_0-distill)"] = export_gguf(
            lowbit.load(RUN_KD / "model.safetensors").eval(), folder / "lowbit-q4_0-kd.gguf", tokenizer_gguf=tok)
    if args.embedding_rows:  # the token embedding (tied head) too: round-to-nearest, or its scales learned
        files.update({
            "RTN Q4_0, token_embd RTN Q4_0": export_gguf(float_model, folder / "rtn-q4_0-emb.gguf", tokenizer_gguf=tok,
                                                         float_linears="q4_0", embeddings="q4_0"),
            "lowbit Q4_0, token_embd RTN Q8_0": export_gguf(int_model, folder / "lowbit-q4_0-embq8.gguf",
                                                            tokenizer_gguf=tok, embeddings="q8_0"),
            "lowbit Q4_0, token_embd RTN Q4_0": export_gguf(int_model, folder / "lowbit-q4_0-embq4.gguf",
                                                            tokenizer_gguf=tok, embeddings="q4_0"),
            "lowbit Q4_0, token_embd Q4_0 scales learned (smollm2-lrqat-q4_0-emb)": export_gguf(
                lowbit.load(RUN_EMB / "model.safetensors").eval(), folder / "lowbit-q4_0-emb.gguf", tokenizer_gguf=tok),
        })  # fmt: skip
    rows, ppl = [], {}
    for label, path in files.items():
        cells, speeds = [], []
        for corpus, wins in corpora.items():
            value, speed = llama_ppl(path, wins, args.threads)
            ppl[label, corpus] = value
            cells.append(f"{value:.2f}")
            speeds.append(speed)
        rows.append([label, f"{path.stat().st_size / 1e6:.1f}", *cells, f"{statistics.mean(speeds):.0f}"])
        print(markdown_table(["model", "file MB", *corpora, "tokens/s"], rows), flush=True)
    own = {c: torch_ppl(int_model, w) for c, w in corpora.items()}
    rows.append(["lowbit's integer model (torch, not a file)", "–", *(f"{own[c]:.2f}" for c in corpora), "–"])
    lines = []
    ours = [k for k in files if k.startswith("lowbit LR-QAT on Q4_0")]  # F16 embeddings: the linears alone differ
    for corpus in corpora:
        f, r = ppl["float (F16)", corpus], ppl["round-to-nearest Q4_0 (gguf reference)", corpus]
        for label in ours:
            q = ppl[label, corpus]
            closed = (r - q) / (r - f) if r != f else float("nan")
            lines.append(f"- {corpus}: {label} closes {100 * closed:.0f} % of round-to-nearest Q4_0's perplexity "
                         f"gap to float ({r:.2f} -> {q:.2f}, float {f:.2f})")  # fmt: skip
        q = ppl["lowbit LR-QAT on Q4_0, block-exact", corpus]
        lines.append(f"- {corpus}: llama.cpp against lowbit's own integer model (LR-QAT Q4_0): "
                     f"{100 * (q / own[corpus] - 1):+.2f} %")  # fmt: skip
    head = ["# SmolLM2-135M in llama.cpp: float, round-to-nearest Q4_0 / Q4_1, lowbit Q4_0 (LR-QAT)", "",
            f"{datetime.date.today()} · {cpu_model()} · {machine_line()} · llama-cpp-python "
            f"{__import__('llama_cpp').__version__}, {args.threads} threads", "",
            f"Perplexity over the first {args.windows} non-overlapping windows of {args.seq} tokens of each corpus; "
            f"lowbit run: `{RUN.relative_to(ROOT)}` ({recipe.qat.steps} LR-QAT steps). "
            f"`python benchmarks/gguf_runtime.py {' '.join(sys.argv[1:] if argv is None else argv)}`", ""]  # fmt: skip
    text = "\n".join(head) + "\n" + markdown_table(["model", "file MB", *corpora, "tokens/s"], rows) + "\n\n"
    text += "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
