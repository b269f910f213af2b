"""Exported integer models: file size against the physical limit, and CPU inference speed vs float.

Size: for each reference model and bit width (every layer at that width, per-channel weight scales,
no 8-bit first/last layer), the model is prepared, converted and written by ``lowbit.save``.

- weight ratio = (packed weights + their scales and zero points, as stored) / (bits/32 x float bytes
  of the quantized weights): 1.00 is the physical limit of ``bits`` bits per weight;
- file ratio = the whole lowbit file / the float model's safetensors file (same tensors, float32).

Speed: the loaded integer model against the float model, batch 1 and batch 256, interleaved rounds in
one process, median; ratios < 1 are faster. Two integer paths: the reference forward (weights
dequantized once at load, float conv/matmul) and ``use_int_matmul`` (int8 x int8 -> int32 matmul for
the eligible linear layers; convolutions stay on the reference path).

    .venv/bin/python benchmarks/export.py [--models mobilenetv2 resnet mlp] [--bits 8 4 3 2 1]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import interleaved_median_times, machine_line, markdown_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit import QuantConfig, QuantSpec  # noqa: E402
from lowbit.export.intmodules import IntConv2d, IntLinear, use_int_matmul  # noqa: E402
from lowbit.models import build_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "export.md"


def _prepared(name: str, bits: int, first_last_bits: int | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    cfg = QuantConfig(
        weight=QuantSpec(bits=bits, granularity="channel"), act=QuantSpec(bits=max(bits, 2)),
        first_last_bits=first_last_bits,
    )
    calib = [torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))]
    return lowbit.prepare(model, cfg, calib=calib).eval()


def sizes(name: str, bits: int, tmp: Path) -> list[object]:
    model = _prepared(name, bits, None)
    path = lowbit.save(model, tmp / f"{name}-{bits}.safetensors")
    float_path = tmp / f"{name}-float.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(name, num_classes=10).state_dict().items()}, str(float_path))
    loaded = lowbit.load(path)
    weight_float = stored = 0
    for mod in loaded.modules():
        if isinstance(mod, IntLinear | IntConv2d) and hasattr(mod.qweight, "weight_int"):
            qw = mod.qweight
            weight_float += 4 * qw.weight_int.numel()
            stored += -(-qw.weight_int.numel() * qw.weight_bits // 8) + 4 * qw.weight_scale.numel()
            stored += 4 * qw.weight_zero_point.numel() if qw.weight_zero_point is not None else 0
    limit = bits / 32 * weight_float
    size, fsize = path.stat().st_size, float_path.stat().st_size
    return [name, f"W{bits}", f"{weight_float:,}", f"{limit:,.0f}", f"{stored:,}", f"{stored / limit:.3f}",
            f"{size:,}", f"{fsize:,}", f"{size / fsize:.3f}"]


def speed(name: str, tmp: Path, repeats: int) -> list[list[object]]:
    model = _prepared(name, 4, 8)
    loaded = lowbit.load(lowbit.save(model, tmp / f"{name}-speed.safetensors"))
    int_mm = copy.deepcopy(loaded)
    n_int = use_int_matmul(int_mm)
    n_linear = sum(isinstance(m, IntLinear) for m in int_mm.modules())
    float_model = build_model(name, num_classes=10).eval()
    rows = []
    for batch in (1, 256):
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            t = interleaved_median_times(
                {"float": lambda x=x: float_model(x), "integer": lambda x=x: loaded(x),
                 "int_mm": lambda x=x: int_mm(x)},
                warmup=5, repeats=repeats,
            )
        rows.append([name, batch, f"{1000 * t['float']:.2f}", f"{1000 * t['integer']:.2f}",
                     f"{t['integer'] / t['float']:.2f}×", f"{batch / t['integer']:,.0f}",
                     f"{1000 * t['int_mm']:.2f} ({n_int}/{n_linear} linears)", f"{t['int_mm'] / t['float']:.2f}×"])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mobilenetv2", "resnet", "mlp"])
    p.add_argument("--bits", nargs="+", type=int, default=[8, 4, 3, 2, 1])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        size_rows = [sizes(m, b, tmp) for m in args.models for b in args.bits]
        speed_rows = [r for m in args.models for r in speed(m, tmp, args.repeats)]
    size_table = markdown_table(
        ["model", "bits", "float bytes of quantized weights", "limit bits/32 x float", "stored weight bytes",
         "weight ratio", "lowbit file bytes", "float file bytes", "file ratio"],
        size_rows,
    )
    speed_table = markdown_table(
        ["model", "batch", "float ms", "integer ms (reference)", "reference / float", "reference images/s",
         "integer ms (int8 matmul path)", "int8 path / float"],
        speed_rows,
    )
    text = (
        "# Exported integer models: size and CPU speed\n\n"
        f"{datetime.date.today()} · {machine_line()}\n\n"
        f"`python benchmarks/export.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        "## File size (every layer at the bit width, per-channel scales)\n\n"
        f"{size_table}\n\n"
        "## Inference speed (W4A4, first/last layer 8 bit; median of interleaved rounds)\n\n"
        f"{speed_table}\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
