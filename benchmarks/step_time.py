"""What a QAT training step costs over a float step, and which implementation makes it cheap.

Side by side in one process, interleaved round by round (``common.interleaved_median_times``), on the
same model, batch and optimizer.

CNNs (``mobilenetv2``, ``resnet``, ``mlp``; W4A4, first and last layer 8 bit): the float model; lowbit
with its default path (on CPU the fused kernel, one C++ autograd node per quantizer; on CUDA the torch
ops); on CPU also lowbit with the equivalent chain of torch ops (``LOWBIT_FUSED=0``); torch's own
learnable fake-quant op (``torch._fake_quantize_learnable_per_{tensor,channel}_affine``) in lowbit's
place; and, unless ``--no-compile``, the torch-ops model under ``torch.compile(fullgraph=True)`` (a graph
break fails that row; its compile time is reported apart).

LLMs (``smollm2``, or ``random-llama`` for a smoke run; ``--llm-dtypes float32 bfloat16``, bfloat16 under
autocast): float fine-tuning of the same linears, full QAT (``QuantLinear``, W4 groups of 128, LSQ),
LR-QAT (adapters inside the grid, rank 32, int8 fixed-point Φ0) and LR-QAT compiled; lm_head float
and frozen, everything else not quantized frozen, AdamW. The LR-QAT rows also report their ratio over
the full-QAT step.

``--breakdown`` (CNNs, CPU) measures instead where the extra time goes: weight quantizers alone,
activation quantizers alone, and each replaced by one learnable multiply, the floor of any per-element
quantizer (an extra pass over the tensor and an autograd node).

Reports the median step time and its ratio over the float step, for each thread count asked (CPU), on
the device asked (``--device cuda``: every step ends in a synchronisation).

    .venv/bin/python benchmarks/step_time.py [--models mobilenetv2 resnet mlp smollm2] [--threads 1 2]
        [--device cpu|cuda] [--llm-dtypes float32 bfloat16] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, interleaved_median_times, machine_line, markdown_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit.config import LowRankSpec, QuantConfig, QuantSpec, Rule  # noqa: E402
from lowbit.models import build_model  # noqa: E402
from lowbit.quant import kernels  # noqa: E402
from lowbit.quant.quantizer import Quantizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "step_time.md"
LLMS = ("smollm2", "random-llama")
ISA = ("avx512f", "avx512_bf16", "avx2", "fma", "neon", "asimd", "sve")


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stepper(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], opt: torch.optim.Optimizer,
    before: Callable[[], None], device: torch.device,
) -> Callable[[], None]:  # fmt: skip
    def step() -> None:
        before()
        loss = loss_fn(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)

    return step


def _kernel_switch(enabled: bool) -> Callable[[], None]:
    return lambda: kernels.set_enabled(enabled)


def _compiled(
    model: nn.Module, make_step: Callable[[nn.Module], Callable[[], None]]
) -> tuple[Callable[[], None] | None, str]:
    """The step of ``torch.compile(model, fullgraph=True)`` (torch ops), after one step that compiles it."""
    kernels.set_enabled(False)
    t0 = time.perf_counter()
    try:
        step = make_step(torch.compile(model, fullgraph=True))
        step()
        return step, f"compile {time.perf_counter() - t0:.0f} s"
    except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
        return None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    finally:
        kernels.set_enabled(True)


def _cnn_pair(
    model_name: str, batch_size: int, device: torch.device
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """The float CNN, its W4A4 copy (first and last layer 8 bit), and a fixed batch ``(x, y)``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    torch.manual_seed(0)
    float_model = build_model(model_name).to(device)
    config = QuantConfig(weight=QuantSpec(bits=4, granularity="channel"), act=QuantSpec(bits=4), first_last_bits=8)
    return float_model, lowbit.prepare(copy.deepcopy(float_model), config, calib=[x]), x, y


def bench_cnn(model_name: str, threads: int, args: argparse.Namespace) -> list[list[object]]:
    device = torch.device(args.device)
    float_model, quant, x, y = _cnn_pair(model_name, args.batch_size, device)

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return nn.functional.cross_entropy(m(x), y)

    def make(m: nn.Module, before: Callable[[], None] | None = None) -> Callable[[], None]:
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        return _stepper(m, loss_fn, opt, before or _kernel_switch(True), device)

    on_cpu = device.type == "cpu"
    fused_ok = on_cpu and kernels.fused() is not None
    default = "lowbit fused kernel" if on_cpu else "lowbit eager (torch ops)"
    contenders: dict[str, Callable[[], None]] = {"float": make(float_model), default: make(quant)}
    notes = {default: "" if fused_ok or not on_cpu else "kernel unavailable: ran torch ops"}
    if on_cpu:
        contenders["lowbit torch ops"] = make(copy.deepcopy(quant), _kernel_switch(False))
    contenders["torch learnable fake-quant op"] = make(_swap_to_torch_op(copy.deepcopy(quant)))
    if args.compile:
        name = "lowbit torch ops + torch.compile"
        step, notes[name] = _compiled(copy.deepcopy(quant), lambda m: make(m, _kernel_switch(False)))
        if step is not None:
            contenders[name] = step
    return _rows(model_name, threads, contenders, notes, args, base="float")


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _OneMultiply(nn.Module):
    """The floor of any learnable fake quantizer: one elementwise multiply by a learnable scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.p


def _replace(model: nn.Module, attr: str, make: Callable[[], nn.Module]) -> nn.Module:
    model = copy.deepcopy(model)
    for mod in model.modules():
        if isinstance(getattr(mod, attr, None), Quantizer):
            setattr(mod, attr, make())
    return model


def bench_breakdown(model_name: str, threads: int, args: argparse.Namespace) -> list[list[object]]:
    """Where the QAT step's extra time goes: the weight quantizers alone, the activation quantizers alone,
    and each replaced by one learnable multiply (what any per-element quantizer costs at least)."""
    float_model, quant, x, y = _cnn_pair(model_name, args.batch_size, torch.device("cpu"))
    models = {
        "float": float_model,
        "W4A4 (fused kernel)": quant,
        "weight quantizers only": _replace(quant, "input_quantizer", _Identity),
        "weights: one multiply instead": _replace(_replace(quant, "input_quantizer", _Identity), "weight_quantizer",
                                                  _OneMultiply),
        "activation quantizers only": _replace(quant, "weight_quantizer", _Identity),
        "activations: one multiply instead": _replace(_replace(quant, "weight_quantizer", _Identity),
                                                      "input_quantizer", _OneMultiply),
    }  # fmt: skip

    def make(m: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
        return _stepper(m, lambda m: nn.functional.cross_entropy(m(x), y), opt, _kernel_switch(True),
                        torch.device("cpu"))  # fmt: skip

    return _rows(model_name, threads, {k: make(m) for k, m in models.items()}, {}, args, base="float")


def bench_llm(model_name: str, threads: int, args: argparse.Namespace) -> list[list[object]]:
    from lowbit.llm.models import load_causal_lm

    device = torch.device(args.device)
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256}  # fmt: skip
    base, _ = load_causal_lm(model_name, small if model_name == "random-llama" else {})
    base = base.to(device)
    vocab = int(base.config.vocab_size)
    ids = torch.randint(0, vocab, (args.llm_batch_size, args.seq_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    weight = QuantSpec(bits=4, granularity="group", group_size=128)
    rules = (Rule(match="lm_head", skip=True),)
    configs = {
        "float (fine-tune the linears)": QuantConfig(weight=None, act=None, rules=rules, freeze_unquantized=True),
        "full QAT": QuantConfig(weight=weight, act=None, rules=rules, freeze_unquantized=True),
        "LR-QAT": QuantConfig(weight=weight, act=None, rules=rules, freeze_unquantized=True,
                              lowrank=LowRankSpec(rank=32)),
    }  # fmt: skip
    rows: list[list[object]] = []
    for dtype_name in args.llm_dtypes:
        dtype = getattr(torch, dtype_name)

        def loss_fn(m: nn.Module, dtype: torch.dtype = dtype) -> torch.Tensor:
            ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
            with ctx:
                return m(input_ids=ids, labels=ids).loss

        def make(m: nn.Module, before: Callable[[], None] | None = None) -> Callable[[], None]:
            params = [p for p in m.parameters() if p.requires_grad]
            return _stepper(m, loss_fn, torch.optim.AdamW(params, lr=1e-6), before or _kernel_switch(True), device)

        models = {name: lowbit.prepare(copy.deepcopy(base), cfg) for name, cfg in configs.items()}
        contenders = {name: make(m) for name, m in models.items()}
        notes: dict[str, str] = {}
        if args.compile:
            name = "LR-QAT + torch.compile"
            step, notes[name] = _compiled(copy.deepcopy(models["LR-QAT"]), lambda m: make(m, _kernel_switch(False)))
            if step is not None:
                contenders[name] = step
        label = f"{model_name} {dtype_name} b{args.llm_batch_size}x{args.seq_len}"
        rows += _rows(label, threads, contenders, notes, args, base="float (fine-tune the linears)",
                      second=("full QAT", ("LR-QAT", "LR-QAT + torch.compile")))  # fmt: skip
        del models, contenders
    return rows


def _rows(
    label: str, threads: int, contenders: dict[str, Callable[[], None]], notes: dict[str, str],
    args: argparse.Namespace, base: str, second: tuple[str, tuple[str, ...]] | None = None,
) -> list[list[object]]:  # fmt: skip
    times = interleaved_median_times(contenders, warmup=args.warmup, repeats=args.rounds)
    kernels.set_enabled(True)
    rows = []
    for name, t in times.items():
        note = notes.get(name, "")
        if second is not None and name in second[1] and second[0] in times:
            note = "; ".join(filter(None, [note, f"{t / times[second[0]]:.2f}x the full-QAT step"]))
        rows.append([label, threads, name, f"{t * 1e3:.1f}", f"{t / times[base]:.2f}x", note])
    for name, note in notes.items():
        if name not in times:
            rows.append([label, threads, name, "–", "–", note])
    return rows


def processor_line(device: torch.device) -> str:
    """The processor (and its vector instruction sets, which the fused kernel is built for) or the GPU."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ISA if f in have]
                break
    except OSError:
        pass
    return f"CPU: {cpu_model()}" + (f" ({' '.join(flags)})" if flags else "")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet", "mlp"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--llm-batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--llm-dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--breakdown", action="store_true", help="CNNs: where the extra time goes (CPU)")
    p.add_argument("--out", type=Path, help=f"default {RESULTS.name}, or step_time_breakdown.md with --breakdown")
    args = p.parse_args(argv)
    args.out = args.out or RESULTS.with_name("step_time_breakdown.md" if args.breakdown else RESULTS.name)
    device = torch.device(args.device)
    threads_list = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    rows: list[list[object]] = []
    for model_name in args.models:
        for threads in threads_list:
            torch.set_num_threads(threads)
            bench = bench_llm if model_name in LLMS else bench_breakdown if args.breakdown else bench_cnn
            new = bench(model_name, threads, args)
            rows.extend(new)
            print(markdown_table(["model", "threads", "step", "ms", "/ float", "note"], new), flush=True)
    table = markdown_table(["model", "threads", "step", "median ms", "over float step", "note"], rows)
    command = " ".join(["python", "benchmarks/step_time.py", *(argv if argv is not None else sys.argv[1:])])
    text = (
        f"# QAT step time over the float step\n\n"
        f"{datetime.date.today()} · {processor_line(device)} · {machine_line()} · device {args.device} · "
        f"CNNs: W4A4, first/last layer 8 bit, batch {args.batch_size} · "
        f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds\n\n"
        f"`{command}`\n\n{table}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
