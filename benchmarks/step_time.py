"""What a QAT training step costs over a float step, and which implementation makes it cheap.

Side by side in one process, interleaved round by round (``common.interleaved_median_times``), on the
same model, batch and optimizer: the float model; lowbit W4A4 with the fused CPU kernel (the default);
lowbit with the equivalent chain of torch ops (``LOWBIT_FUSED=0``); torch's own learnable fake-quant op
(``torch._fake_quantize_learnable_per_{tensor,channel}_affine``) in lowbit's place; and, unless
``--no-compile``, the torch-ops model under ``torch.compile`` (its compile time reported apart).
Reports the median step time and its ratio over the float step, for each thread count asked.

    .venv/bin/python benchmarks/step_time.py [--models mobilenetv2 resnet mlp] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved_median_times, machine_line, markdown_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit.config import QuantConfig, QuantSpec  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.quant import kernels  # noqa: E402
from lowbit.quant.quantizer import Quantizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.md"


class TorchLearnableFQ(nn.Module):
    """Stands in for a lowbit ``Quantizer``'s forward with torch's fused learnable fake-quant op."""

    def __init__(self, q: Quantizer) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q
        qmin, qmax = q.int_grid()
        zp = q.zero_point if q.zero_point is not None else torch.zeros_like(q.scale)
        if q.granularity == "tensor":
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, q.scale.reshape(1), zp.reshape(1), qmin, qmax, 1.0
            )
        axis = 0 if q.shape is not None else 1
        return torch._fake_quantize_learnable_per_channel_affine(x, q.scale, zp, axis, qmin, qmax, 1.0)


def _swap_to_torch_op(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        for attr in ("weight_quantizer", "input_quantizer"):
            q = getattr(mod, attr, None)
            if isinstance(q, Quantizer):
                setattr(mod, attr, TorchLearnableFQ(q))
    return model


def _stepper(model: nn.Module, x: torch.Tensor, y: torch.Tensor, before: Callable[[], None]) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        before()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(model_name: str, threads: int, args: argparse.Namespace) -> list[list[object]]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    float_model = build_model(model_name)
    config = QuantConfig(
        weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=4), first_last_bits=8
    )
    quant = lowbit.prepare(copy.deepcopy(float_model), config, calib=[x])
    torch_ops = copy.deepcopy(quant)
    torch_op = _swap_to_torch_op(copy.deepcopy(quant))
    fused_ok = kernels.fused() is not None

    def on() -> None:
        kernels.set_enabled(True)

    def off() -> None:
        kernels.set_enabled(False)

    contenders: dict[str, Callable[[], None]] = {
        "float": _stepper(float_model, x, y, on),
        "lowbit fused kernel": _stepper(quant, x, y, on),
        "lowbit torch ops": _stepper(torch_ops, x, y, off),
        "torch learnable fake-quant op": _stepper(torch_op, x, y, on),
    }
    notes = {"lowbit fused kernel": "" if fused_ok else "kernel unavailable: ran torch ops"}
    if args.compile:
        compiled = copy.deepcopy(quant)
        off()
        t0 = time.perf_counter()
        try:
            cmodel = torch.compile(compiled)
            _stepper(cmodel, x, y, off)()
            notes["lowbit torch ops + torch.compile"] = f"compile {time.perf_counter() - t0:.0f} s"
            contenders["lowbit torch ops + torch.compile"] = _stepper(cmodel, x, y, off)
        except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
            notes["lowbit torch ops + torch.compile"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        on()
    times = interleaved_median_times(contenders, warmup=args.warmup, repeats=args.rounds)
    kernels.set_enabled(True)
    base = times["float"]
    rows = []
    for name, t in times.items():
        rows.append([model_name, threads, name, f"{t * 1e3:.1f}", f"{t / base:.2f}x", notes.get(name, "")])
    for name, note in notes.items():
        if name not in times:
            rows.append([model_name, threads, name, "–", "–", note])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet", "mlp"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows: list[list[object]] = []
    for model_name in args.models:
        for threads in args.threads:
            rows.extend(bench(model_name, threads, args))
            print(markdown_table(["model", "threads", "step", "ms", "/ float", "note"], rows[-5:]), flush=True)
    table = markdown_table(["model", "threads", "step", "median ms", "over float step", "note"], rows)
    text = (
        f"# QAT step time over the float step (W4A4, first/last layer 8 bit)\n\n"
        f"{datetime.date.today()} · {machine_line()} · batch {args.batch_size}, "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds\n\n"
        f"`{' '.join(['python', 'benchmarks/step_time.py', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
        f"{table}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
