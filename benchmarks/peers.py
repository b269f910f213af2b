"""lowbit beside the peer QAT toolkits, in one run: same model, data, bits, epochs, seed and loop.

    python benchmarks/peers.py                        # W4A4 and W3A3, mobilenetv2 and mlp, 1 QAT epoch
    python benchmarks/peers.py --quick                # a few hundred images, a few steps (development)

Contenders (first and last quantized layer at 8 bits in every one, the first layer's input float):

    lowbit    lowbit.prepare, QuantConfig(weight=QuantSpec(bits=b, granularity="channel"),
              act=QuantSpec(bits=b), first_last_bits=8): LSQ, learned scales, MSE-initialised.
    eager     torch.ao.quantization eager QAT: conv+BN / linear+BN fused for QAT (fuse_modules_qat) where
              they sit side by side in an nn.Sequential, prepare_qat with FakeQuantize(MovingAverage
              (PerChannel)MinMaxObserver); sub-8-bit through quant_min/quant_max. Weights per-channel
              symmetric in [-2^(b-1), 2^(b-1)-1]; activations per-tensor affine in [0, 2^b-1] at the output
              of every module eager mode observes (plain ``+`` residual adds stay float).
    brevitas  every Conv2d/Linear swapped for brevitas.nn.QuantConv2d/QuantLinear with
              Int8WeightPerChannelFloat (weight_bit_width=b) and an Int8/Uint8ActPerTensorFloat input
              quantizer (input_bit_width=b; unsigned where the calibration inputs are >= 0, as lowbit
              decides); activation scales learned, initialised by brevitas' calibration_mode.
    torchao   torchao.quantization.qat.QATConfig with IntxFakeQuantizeConfig(int<b>, "per_channel") for
              weights and (int<b>, "per_token", asymmetric) for activations (dynamic; torchao offers no
              per-tensor activation granularity). Its QAT swaps nn.Linear only and silently leaves
              Conv2d float, so it runs on models without Conv2d (the MLP) and the table says so.

Protocol, identical for every contender:
    1. The float model is pre-trained by lowbit's own loop (``--float-epochs``) and cached under
       runs/.cache (benchmarks/common.py: float_model); every contender starts from these weights.
    2. Calibration: the same training batches (the default recipe's calib_batches, in the order
       ``lowbit train`` uses) go through each toolkit's own initialisation (lowbit: range init;
       eager: observers, in eval mode; brevitas: calibration_mode, BatchNorm statistics restored
       afterwards; torchao: dynamic, needs none).
    3. QAT for ``--epochs`` with one plain loop: batches of 128 in the order iterate_batches(seed,
       epoch) gives; SGD (momentum 0.9, Nesterov, weight decay 5e-5) at lr 0.02 with a cosine
       schedule over the QAT steps for the weights, Adam at 1e-4 (constant) for learnable quantizer
       parameters (lowbit's scales, brevitas' activation scales). A non-finite loss stops that run
       ("diverged"); its accuracy is still evaluated.
    4. Test accuracy on the whole test set in eval mode, with fake quantization on (eager: observers
       frozen first).
    5. Step time: forward + backward + optimizer step, on fresh copies prepared the same way, run in
       interleaved rounds (one step of each contender per round, order rotating), ``--warmup`` untimed
       rounds then the median of ``--timing-steps`` rounds; reported as a ratio over the float step.
    6. Peak memory: each contender again in a fresh subprocess holding only the model and a few batches:
       after set-up (imports, model, prepare, calibration) the kernel's peak-RSS mark is reset, then
       the warm-up and timed steps run; the figure is the peak RSS (VmHWM: ru_maxrss would also count
       the parent this process was forked from) minus the RSS after set-up, in MB.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import logging
import math
import shlex
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from common import float_model as cached_float_model
from common import (
    float_recipe,
    interleaved_median_times,
    load_data,
    machine_line,
    markdown_table,
    peak_rss_mb,
    release_free_memory,
    reset_peak_rss,
    rss_mb,
)
from peer_toolkits import FLOAT, TOOLKITS, Prepared, Toolkit, _quiet_imports
from torch import nn
from tqdm.auto import tqdm

from lowbit.config import Recipe
from lowbit.data import VisionData, iterate_batches, num_batches
from lowbit.data.vision import NUM_CLASSES
from lowbit.models import MODELS, build_model
from lowbit.tasks.vision import evaluate_classifier as evaluate

HERE = Path(__file__).resolve().parent
# the protocol is lowbit's default recipe's QAT stage, applied to every toolkit alike
_QAT = Recipe().qat
WEIGHT_LR, WEIGHT_MOMENTUM, WEIGHT_DECAY, QUANT_LR = _QAT.lr, _QAT.momentum, _QAT.weight_decay, _QAT.scale_lr
CALIB_BATCHES = Recipe().calib_batches
WORKER_TAG = "PEERS-MEMORY-RESULT "


# -- the shared training step and loop -----------------------------------------------------------------


class Stepper:
    """One training step (forward, backward, optimizer steps), the same for every contender."""

    def __init__(self, prepared: Prepared, total_steps: int) -> None:
        self.model = prepared.model
        sgd = torch.optim.SGD(
            prepared.weights, lr=WEIGHT_LR, momentum=WEIGHT_MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
        )
        self.opts: list[torch.optim.Optimizer] = [sgd]
        if prepared.qparams:
            self.opts.append(torch.optim.Adam(prepared.qparams, lr=QUANT_LR))
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            sgd, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1)))
        )

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The step's loss; when it is not finite, no parameter is changed."""
        loss = nn.functional.cross_entropy(self.model(xb), yb)
        if not torch.isfinite(loss):
            return loss.detach()
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.opts:
            o.step()
        self.sched.step()
        return loss.detach()


def train(prepared: Prepared, data: VisionData, args: argparse.Namespace, desc: str) -> str:
    """QAT for ``args.epochs``; returns "" or a note saying where the loss stopped being finite."""
    bpe = num_batches(data.train_x.shape[0], args.batch_size)
    total = math.ceil(args.epochs * bpe)
    end = min(total, args.max_steps) if args.max_steps else total
    stepper = Stepper(prepared, total)
    prepared.model.train()
    step = 0
    with tqdm(total=end, desc=desc, leave=False, dynamic_ncols=True) as bar:
        while step < end:
            for xb, yb in iterate_batches(data.train_x, data.train_y, args.batch_size, True, args.seed, step // bpe):
                loss = stepper(xb, yb)
                if not torch.isfinite(loss):
                    return f"diverged: loss {loss.item()} at step {step + 1}/{end}"
                step += 1
                bar.update(1)
                if step >= end:
                    break
    return ""


# -- one model -----------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of a model's table; None where there is no figure (not run, not available, failed)."""

    toolkit: str
    bits: str
    accuracy: float | None = None
    step_ratio: float | None = None
    memory_mb: float | None = None
    note: str = ""


def _fresh(model_name: str, model_args: dict[str, object], state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_model(model_name, num_classes=NUM_CLASSES, **model_args)
    model.load_state_dict(state)
    return model


def _contenders(args: argparse.Namespace) -> list[tuple[str, Toolkit, int]]:
    """(key, toolkit, bits) of every quantized contender in table order."""
    return [(f"{k}/W{b}A{b}", TOOLKITS[k], b) for b in args.bits for k in args.toolkits]


def bench_model(model_name: str, args: argparse.Namespace) -> str:
    """Run every contender on one model; returns its markdown section."""
    model_args: dict[str, object] = {}
    recipe = float_recipe(model_name, model_args, args.float_epochs, args.seed, args.train_subset, args.test_subset)
    data = load_data(recipe.data)
    fmodel = cached_float_model(
        model_name, model_args, args.float_epochs, args.seed,
        train_subset=args.train_subset, test_subset=args.test_subset,
    )  # fmt: skip
    state = copy.deepcopy(fmodel.state_dict())
    float_acc = evaluate(fmodel, data.test_x, data.test_y)["accuracy"]
    n_params = sum(p.numel() for p in fmodel.parameters())
    calib = [
        xb
        for _, (xb, _yb) in zip(
            range(CALIB_BATCHES),
            iterate_batches(data.train_x, data.train_y, args.batch_size, True, args.seed + 1, 0),
            strict=False,
        )
    ]
    print(f"\n== {model_name}: {n_params:,} parameters, float accuracy {float_acc:.2f} %", flush=True)

    rows = {"float": Row(FLOAT.label, "32/32", float_acc, note="float checkpoint (lowbit pre-training)")}
    runnable: dict[str, tuple[Toolkit, int]] = {"float": (FLOAT, 32)}
    problems = {k: TOOLKITS[k].problem() for k in args.toolkits}
    for key, tk, bits in _contenders(args):
        row = rows[key] = Row(tk.label, f"{bits}/{bits}")
        why = problems[key.split("/")[0]] or (tk.unsupported(fmodel) if tk.unsupported else None)
        if why:
            row.note = why
            print(f"  {key:<20} {why}", flush=True)
            continue
        torch.manual_seed(args.seed)
        try:
            prepared = tk.prepare(_fresh(model_name, model_args, state), bits, calib)
            row.note = train(prepared, data, args, key)
            if prepared.before_eval:
                prepared.before_eval(prepared.model)
            row.accuracy = evaluate(prepared.model, data.test_x, data.test_y)["accuracy"]
        except Exception as e:  # one toolkit's failure must not lose the others' results
            traceback.print_exc()
            row.note = f"failed: {type(e).__name__}: {e}"
            print(f"  {key:<20} {row.note}", flush=True)
            continue
        runnable[key] = (tk, bits)
        print(f"  {key:<20} accuracy {row.accuracy:6.2f} %  {row.note}", flush=True)

    timing = time_steps(model_name, model_args, state, data, calib, runnable, args)
    for key, seconds in timing.items():
        rows[key].step_ratio = seconds / timing["float"]
    for key, (_, bits) in runnable.items():
        rows[key].memory_mb = measure_memory(model_name, model_args, state, data, calib, key, bits, args)
        ratio = rows[key].step_ratio
        print(f"  {key:<20} step {ratio:.2f}x float, peak memory {rows[key].memory_mb:.1f} MB", flush=True)

    def fmt(v: float | None, spec: str, suffix: str = "") -> str:
        return "–" if v is None or math.isnan(v) else f"{v:{spec}}{suffix}"

    table = markdown_table(
        [
            "toolkit",
            "bits (W/A)",
            "accuracy (%)",
            "Δ vs float (points)",
            "step time / float step",
            "peak memory (MB)",
            "note",
        ],
        [
            (
                r.toolkit,
                r.bits,
                fmt(r.accuracy, ".2f"),
                fmt(None if r.accuracy is None else r.accuracy - float_acc, "+.2f"),
                fmt(r.step_ratio, ".2f", "x"),
                fmt(r.memory_mb, ".1f"),
                r.note,
            )
            for r in rows.values()
        ],
        align="llrrrrl",
    )
    section = (
        f"## {model_name} ({n_params:,} parameters)\n\n"
        f"Float accuracy {float_acc:.2f} %; float training step {1000 * timing['float']:.1f} ms (median).\n\n"
        f"{table}\n"
    )
    return section


def _timing_batches(data: VisionData, args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = args.warmup + args.timing_steps
    it = iterate_batches(data.train_x, data.train_y, args.batch_size, True, args.seed, 0, drop_last=True)
    batches = [b for _, b in zip(range(n), it, strict=False)]
    if not batches:
        raise SystemExit(f"need at least one full batch of {args.batch_size}: the training subset is smaller")
    return [batches[i % len(batches)] for i in range(n)]


def time_steps(
    model_name: str,
    model_args: dict[str, object],
    state: dict[str, torch.Tensor],
    data: VisionData,
    calib: list[torch.Tensor],
    runnable: dict[str, tuple[Toolkit, int]],
    args: argparse.Namespace,
) -> dict[str, float]:
    """Median step seconds of each contender, on fresh prepared copies, in interleaved rounds."""
    batches = _timing_batches(data, args)
    steps: dict[str, Callable[[], None]] = {}
    for key, (tk, bits) in runnable.items():
        torch.manual_seed(args.seed)
        with _quiet_imports():
            stepper = Stepper(tk.prepare(_fresh(model_name, model_args, state), bits, calib), len(batches))
        stepper.model.train()
        counter = iter(range(10**9))

        def step(stepper: Stepper = stepper, counter: Iterator[int] = counter) -> None:
            xb, yb = batches[next(counter) % len(batches)]
            stepper(xb, yb)

        steps[key] = step
    print(f"  timing {len(steps)} contenders: {args.warmup} + {args.timing_steps} interleaved rounds", flush=True)
    return interleaved_median_times(steps, args.warmup, args.timing_steps)


# -- peak memory, in a fresh process per contender -----------------------------------------------------


def measure_memory(
    model_name: str,
    model_args: dict[str, object],
    state: dict[str, torch.Tensor],
    data: VisionData,
    calib: list[torch.Tensor],
    key: str,
    bits: int,
    args: argparse.Namespace,
) -> float:
    """Peak RSS increase (MB) over the warm-up and timed steps, measured in a fresh subprocess."""
    batches = _timing_batches(data, args)
    spec = {
        "model_name": model_name,
        "model_args": model_args,
        "state": state,
        "toolkit": key.split("/")[0],
        "bits": bits,
        "calib": calib,
        "batches": batches,
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.pt"
        torch.save(spec, path)
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-worker", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    for line in proc.stdout.splitlines():
        if line.startswith(WORKER_TAG):
            result = json.loads(line[len(WORKER_TAG) :])
            return float(result["peak_mb"]) - float(result["setup_mb"]) if result["reset"] else math.nan
    sys.stderr.write(proc.stderr[-4000:])
    print(f"  {key:<20} memory worker failed (exit {proc.returncode})", flush=True)
    return math.nan


def memory_worker(path: str) -> None:
    """The subprocess side of ``measure_memory``: set up, reset the peak-RSS mark, step, report."""
    spec = torch.load(path, weights_only=True)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tk = FLOAT if spec["toolkit"] == "float" else TOOLKITS[spec["toolkit"]]
    model = _fresh(spec["model_name"], spec["model_args"], spec["state"])
    del spec["state"]
    with _quiet_imports():
        stepper = Stepper(tk.prepare(model, spec["bits"], spec["calib"]), len(spec["batches"]))
    stepper.model.train()
    gc.collect()
    release_free_memory()  # what set-up freed but malloc kept would otherwise hide in the baseline
    setup = rss_mb()
    reset = reset_peak_rss()
    for xb, yb in spec["batches"]:
        stepper(xb, yb)
    # Without a reset, ru_maxrss may be the set-up's own peak: report nothing rather than a wrong figure.
    print(WORKER_TAG + json.dumps({"setup_mb": setup, "peak_mb": peak_rss_mb(), "reset": reset}), flush=True)


# -- the command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "mlp"], choices=sorted(MODELS))
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3], help="W<b>A<b> for each b (first/last at 8)")
    p.add_argument("--toolkits", nargs="+", default=list(TOOLKITS), choices=list(TOOLKITS))
    p.add_argument("--epochs", type=float, default=1.0, help="QAT epochs from the float checkpoint")
    p.add_argument("--float-epochs", type=float, default=3.0, help="pre-training epochs (lowbit's default recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5, help="untimed rounds before the timed ones")
    p.add_argument("--timing-steps", type=int, default=30, help="timed interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    p.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images only")
    p.add_argument("--quick", action="store_true", help="a few hundred images and a few steps, for development")
    p.add_argument("--out", type=Path, default=None, help="markdown output (default benchmarks/results/peers.md)")
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for b in args.bits:
        if not 2 <= b <= 8:
            p.error(f"--bits {b}: allowed 2..8")
    args.max_steps = None
    if args.quick:
        args.train_subset, args.test_subset = args.train_subset or 512, args.test_subset or 500
        args.max_steps = 4
        args.float_epochs = min(args.float_epochs, 1.0)
        args.warmup, args.timing_steps = min(args.warmup, 2), min(args.timing_steps, 4)
    if args.out is None:  # quick results are not results: keep them out of the repository
        args.out = HERE.parent / "runs" / "peers-quick.md" if args.quick else HERE / "results" / "peers.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    versions = ", ".join(f"{tk.label.split(' ')[0]} {tk.version()}" for tk in TOOLKITS.values() if not tk.problem())
    sections = [bench_model(name, args) for name in args.models]
    subsets = "".join(
        f"; {verb} on the first {n} {split} images only"
        for verb, n, split in (("trained", args.train_subset, "training"), ("evaluated", args.test_subset, "test"))
        if n
    )
    report = "\n".join(
        [
            "# lowbit beside peer QAT toolkits",
            "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {machine_line(args.threads)}",
            f"- toolkits: {versions}",
            f"- command: `{command}`",
            f"- protocol: every toolkit starts from the same cached float checkpoint (lowbit pre-training, "
            f"{args.float_epochs:g} epoch(s)), calibrates on the same {CALIB_BATCHES} batches, then trains "
            f"{args.epochs:g} QAT epoch(s) with one shared loop (batch {args.batch_size}, same data order, SGD "
            f"Nesterov lr {WEIGHT_LR} cosine for weights, Adam {QUANT_LR} for learnable quantizer parameters, "
            f"seed {args.seed}); first and last layers at 8 bits, first layer's input float. Accuracy: the "
            f"Fashion-MNIST test set, eval mode, fake quantization on{subsets}."
            + (" QUICK MODE: subsets and a few steps, the numbers mean nothing." if args.quick else ""),
            f"- step time: median of {args.timing_steps} forward+backward+optimizer steps after {args.warmup} "
            "warm-up, contenders interleaved round by round, divided by the float model's step.",
            "- peak memory: a fresh subprocess per contender; peak RSS (VmHWM, the kernel's high-water mark "
            "behind ru_maxrss, reset at the end of set-up; ru_maxrss itself would include the parent process "
            "it was forked from) minus the RSS after set-up (model, prepare, calibration), "
            "over the same warm-up + timed steps. Includes optimizer state, activations and allocator caching.",
            "- toolkit set-up: see the docstring of benchmarks/peers.py (eager: per-channel symmetric weights, "
            "per-tensor affine outputs of every observed module, residual adds float; brevitas: per-channel "
            "abs-max weights on a narrow grid ±(2^(b-1)-1), learned per-tensor input scales; torchao: dynamic "
            "per-channel weights and per-token activations, nn.Linear only).",
            "",
            *sections,
        ]
    )
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
