"""ONNX QDQ models in onnxruntime against the float ONNX model: latency, accuracy, and what ORT fuses.

Models. With ``--runs RUN ...`` each finished lowbit run (``config.yaml`` + ``model.safetensors``) gives
its integer model (``lowbit.load``, as ``lowbit export`` does) and, as the float reference, the float
model its QAT started from (lowbit's cache ``<runs parent>/.cache``, keyed by the run's data, model,
pre-training stage and seed; trained now if missing). Without runs, each of ``--models`` is the default
recipe's float model (``runs/.cache``, shared with ``lowbit train default``) quantized at each of
``--bits`` by post-training quantization only: ``lowbit.prepare`` with the recipe's ``quant`` section
(first/last layer 8 bit) and ``calib_batches`` calibration batches, no training step. Its accuracy is what
a run reports as *direct* (round-to-nearest), not QAT accuracy; for latency the two are the same graph.

Export. Both sides are written by ``lowbit.export.onnx.export_onnx`` (opset 21), the float model after
``prepare`` with ``QuantConfig(weight=None, act=None)``, so the two graphs differ only by the QDQ nodes
(Conv, BatchNormalization, Clip, ... are the same nodes in both).

Fusion. Each session runs on the CPUExecutionProvider at ``ORT_ENABLE_ALL``, and ORT's optimized graph is
written out (``SessionOptions.optimized_model_filepath``) and its nodes counted: integer kernels
(``QLinear*``, ``*Integer*``, ``QGemm``, ``MatMulNBits``) against the QuantizeLinear / DequantizeLinear
left in it and the float convolutions.

Latency. Per model, the float session and every quantized session (each also once more with
``session.disable_quant_qdq``, ORT's QDQ handling off) run one batch per round, rotating
(``interleaved_median_times``), after ``--warmup`` untimed rounds; the median of the rounds, at batch 1
and 256, for each ``--threads`` (intra-op threads; inter-op 1, sequential). Accuracy: top-1 on the
Fashion-MNIST test set (``--test-subset`` to shorten) through the same runtime.

    .venv/bin/python benchmarks/onnx_latency.py [--models mobilenetv2 resnet] [--bits 8 4] [--runs RUN ...]
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS_DIR, cpu_model, float_recipe, interleaved_median_times, machine_line, markdown_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QuantConfig  # noqa: E402
from lowbit.config import Recipe, recipe_from_dict  # noqa: E402
from lowbit.export.onnx import DEFAULT_OPSET, export_onnx  # noqa: E402
from lowbit.tasks import TASKS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_latency.md"
FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


@dataclasses.dataclass
class Quantized:
    grid: str  # e.g. "W4A4, first/last 8"
    source: str  # "PTQ" or the run directory
    path: Path


@dataclasses.dataclass
class Group:
    """One float ONNX model and the quantized ONNX models made from it, with the test set."""

    model: str
    float_path: Path
    quantized: list[Quantized]
    test_x: torch.Tensor
    test_y: torch.Tensor


def is_integer_kernel(op: str) -> bool:
    op = op.split(".")[-1]
    return op.startswith("QLinear") or "Integer" in op or op in ("QGemm", "MatMulNBits", "DynamicQuantizeMatMul")


def grid_name(q: QuantConfig) -> str:
    w, a = q.weight.bits if q.weight else 32, q.act.bits if q.act else 32
    return f"W{w}A{a}" + (f", first/last {q.first_last_bits}" if q.first_last_bits is not None else "")


def float_of(task: Any, runs_dir: Path, progress: bool) -> nn.Module:
    """The task's pre-trained float model from ``runs_dir/.cache`` (as ``common.float_model``), trained if missing."""
    scratch = runs_dir / f"benchmark-float-{task.recipe.model.name}"  # pre-training's scratch space
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "metrics.jsonl").unlink(missing_ok=True)
    return task.float_model(scratch, resume=False, progress=progress).cpu().eval()


def export_float(model: nn.Module, path: Path, sample: torch.Tensor) -> Path:
    """The float model through lowbit's own writer: float IntConv2d / IntLinear, no QDQ."""
    plain = lowbit.convert(lowbit.prepare(copy.deepcopy(model), QuantConfig(weight=None, act=None)))
    return export_onnx(plain, path, sample)


def group_of_run(run_dir: Path, tmp: Path, progress: bool) -> Group:
    recipe = recipe_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    if recipe.task != "classification":
        raise SystemExit(f"{run_dir}: task {recipe.task!r}; this benchmark takes classification runs")
    task = TASKS[recipe.task].for_run(recipe, run_dir)
    name = f"{recipe.model.name}-{run_dir.name}"
    sample = task.sample_input()
    float_path = export_float(float_of(task, run_dir.parent, progress), tmp / f"{name}-float.onnx", sample)
    quant_path = export_onnx(lowbit.load(run_dir / "model.safetensors"), tmp / f"{name}-quant.onnx", sample)
    shown = run_dir.relative_to(RUNS_DIR.parent) if run_dir.is_relative_to(RUNS_DIR.parent) else run_dir
    grid = grid_name(recipe.quant) + "".join(f" + {m['name']}" for m in recipe.methods)
    quantized = [Quantized(grid, f"QAT run {shown}", quant_path)]
    return Group(recipe.model.name, float_path, quantized, task.data.test_x, task.data.test_y)


def group_of_ptq(model_name: str, bits: list[int], epochs: float, seed: int, tmp: Path, progress: bool) -> Group:
    recipe = float_recipe(model_name, None, epochs, seed)
    task = TASKS[recipe.task](recipe)
    model = float_of(task, RUNS_DIR, progress)
    sample = task.sample_input()
    float_path = export_float(model, tmp / f"{model_name}-float.onnx", sample)
    quantized = []
    for b in bits:
        q = recipe.quant
        assert q.weight is not None and q.act is not None  # the default recipe quantizes both
        cfg = dataclasses.replace(q, weight=dataclasses.replace(q.weight, bits=b),
                                  act=dataclasses.replace(q.act, bits=b))  # fmt: skip
        torch.manual_seed(recipe.seed)
        prepared = lowbit.prepare(copy.deepcopy(model), cfg, calib=task.calib(recipe.calib_batches)).eval()
        path = export_onnx(prepared, tmp / f"{model_name}-w{b}a{b}.onnx", sample)
        quantized.append(Quantized(grid_name(cfg), f"PTQ ({recipe.calib_batches} calib batches, no training)", path))
    return Group(model_name, float_path, quantized, task.data.test_x, task.data.test_y)


def session(path: Path, threads: int, optimized: Path | None = None, qdq: bool = True) -> Any:
    """An ORT CPU session at ORT_ENABLE_ALL; ``qdq=False`` sets ``session.disable_quant_qdq``: ORT then treats
    Q/DQ as plain float ops (folds the weights' DequantizeLinear, fuses Conv + BatchNorm + Clip) and runs no
    integer kernel."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # no warning about saving an NCHWc-optimized graph
    if not qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> collections.Counter[str]:
    import onnx

    # ops outside the default domain named by its last part: com.microsoft.nchwc Conv is "nchwc.Conv"
    nodes = onnx.load(str(path)).graph.node
    return collections.Counter(f"{n.domain.split('.')[-1]}.{n.op_type}" if n.domain else n.op_type for n in nodes)


def optimized_counts(path: Path, threads: int) -> collections.Counter[str]:
    """Node counts of the graph ORT runs for ``path`` (CPU, ORT_ENABLE_ALL)."""
    dump = path.with_suffix(".ort-optimized.onnx")
    session(path, threads, dump)
    return op_counts(dump)


def accuracy(sess: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    pred = [sess.run(None, {"input": x[i : i + batch_size].numpy()})[0].argmax(1) for i in range(0, len(x), batch_size)]
    return 100.0 * float((np.concatenate(pred) == y.numpy()).mean())


def fmt_counts(c: collections.Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def measure(group: Group, args: argparse.Namespace) -> tuple[list[list[object]], list[list[object]], list[str]]:
    """Rows of the fusion / accuracy table, rows of the latency table, and the full op counts (markdown list)."""
    x, y = group.test_x, group.test_y
    if args.test_subset is not None:
        x, y = x[: args.test_subset], y[: args.test_subset]
    threads = max(args.threads)
    float_sess = session(group.float_path, threads)
    float_acc = accuracy(float_sess, x, y)
    float_opt = optimized_counts(group.float_path, threads)
    notes = [f"- {group.model} float: file {fmt_counts(op_counts(group.float_path))}; ORT runs {fmt_counts(float_opt)}"]
    fusion_rows = []
    for q in group.quantized:
        before, after = op_counts(q.path), optimized_counts(q.path, threads)
        integer = {k: v for k, v in after.items() if is_integer_kernel(k)}
        float_kernels = {k: v for k, v in after.items() if k.split(".")[-1] in FLOAT_KERNELS}
        acc = accuracy(session(q.path, threads), x, y)
        fusion_rows.append([
            group.model, q.grid, q.source, f"{before['QuantizeLinear']} / {before['DequantizeLinear']}",
            fmt_counts(integer), f"{after['QuantizeLinear']} / {after['DequantizeLinear']}",
            fmt_counts(float_kernels), f"{float_acc:.2f}", f"{acc:.2f}", len(x),
        ])
        notes.append(f"- {group.model} {q.grid}: file {fmt_counts(before)}; ORT runs {fmt_counts(after)}")
        print(f"{group.model} {q.grid}: integer kernels {fmt_counts(integer)}; Q/DQ left "
              f"{after['QuantizeLinear']}/{after['DequantizeLinear']}; acc float {float_acc:.2f} quant {acc:.2f}")
    latency_rows = []
    for t in args.threads:
        sessions = {"float": session(group.float_path, t)} | {q.grid: session(q.path, t) for q in group.quantized}
        sessions |= {f"{q.grid} qdq off": session(q.path, t, qdq=False) for q in group.quantized}
        for batch, repeats in ((1, args.repeats), (256, args.repeats_256)):
            feed = {"input": x[torch.arange(batch) % len(x)].numpy()}  # test images, cycled if a subset is short
            steps = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
            times = interleaved_median_times(steps, warmup=args.warmup, repeats=repeats)
            for q in group.quantized:
                f_ms, q_ms, off_ms = (1000 * times[k] for k in ("float", q.grid, f"{q.grid} qdq off"))
                latency_rows.append([group.model, q.grid, batch, t, repeats, f"{f_ms:.3f}", f"{q_ms:.3f}",
                                     f"{q_ms / f_ms:.2f}×", f"{off_ms:.3f}", f"{off_ms / f_ms:.2f}×"])
                print(f"{group.model} {q.grid} batch {batch} threads {t}: float {f_ms:.3f} ms, quantized "
                      f"{q_ms:.3f} ms ({q_ms / f_ms:.2f}×), QDQ handling off {off_ms:.3f} ms ({off_ms / f_ms:.2f}×)")
    return fusion_rows, latency_rows, notes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", type=Path, default=[], metavar="RUN",
                   help="finished classification runs (QAT); without them, PTQ of --models at --bits")
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4], help="PTQ grids: W{b}A{b}, first/last 8 bit")
    p.add_argument("--float-epochs", type=float, default=Recipe().pretrain.epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=30, help="timed rounds at batch 1")
    p.add_argument("--repeats-256", type=int, default=10, help="timed rounds at batch 256")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--test-subset", type=int, default=None, help="first N test images for accuracy (default all)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if args.runs:
            groups = [group_of_run(r.resolve(), tmp, not args.no_progress) for r in args.runs]
        else:
            groups = [group_of_ptq(m, args.bits, args.float_epochs, args.seed, tmp, not args.no_progress)
                      for m in args.models]
        results = [measure(g, args) for g in groups]
    fusion, latency = [r for f, _, _ in results for r in f], [r for _, lat, _ in results for r in lat]
    notes = [n for _, _, ns in results for n in ns]
    command = " ".join(["python", "benchmarks/onnx_latency.py", *map(shlex.quote, argv or sys.argv[1:])])
    fusion_table = markdown_table(
        ["model", "grid", "quantized by", "Q / DQ in file", "integer kernels in ORT's graph", "Q / DQ left",
         "float conv / gemm left", "float acc %", "quantized acc %", "test images"],
        fusion, "lllrlrlrrr",
    )
    latency_table = markdown_table(
        ["model", "grid", "batch", "threads", "rounds", "float ms", "quantized ms", "quantized / float",
         "quantized ms, QDQ off", "QDQ off / float"],
        latency, "llrrrrrrrr",
    )
    text = "\n".join([
        "# ONNX QDQ models in onnxruntime vs the float ONNX model (Fashion-MNIST)",
        "",
        f"{datetime.date.today().isoformat()} · {cpu_model()} · {machine_line()} · onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL, inter-op 1, sequential), "
        f"opset {DEFAULT_OPSET}",
        "",
        f"`{command}`",
        "",
        "## What onnxruntime makes of the QDQ graph, and accuracy",
        "",
        "*Integer kernels*: nodes of ORT's optimized graph that compute on integers (QLinearConv, QGemm, "
        "ConvInteger, MatMulInteger, MatMulNBits, ...); *Q / DQ left*: QuantizeLinear / DequantizeLinear nodes "
        "it still runs; *float conv / gemm left*: float kernels (FusedConv is Conv fused with its activation). "
        "PTQ accuracy is round-to-nearest after calibration, before any QAT step.",
        "",
        fusion_table,
        "",
        "## Latency (median of interleaved rounds; ratios < 1: the quantized model is faster)",
        "",
        "*QDQ off*: the same quantized file with `session.disable_quant_qdq=1`: ORT runs Q/DQ as float ops and "
        "folds the weights' DequantizeLinear into float weights, so it measures the cost of the activations' "
        "Q/DQ alone, with the float model's fusions (Conv + BatchNorm + Clip, NCHWc).",
        "",
        latency_table,
        "",
        "## Node counts: exported file and ORT's optimized graph",
        "",
        *notes,
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
