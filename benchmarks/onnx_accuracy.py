"""ONNX QDQ export against lowbit's integer model, on the full Fashion-MNIST test set of real runs.

For each RUN (default ``runs/default``) the integer model the run saved (``model.safetensors``, read
by ``lowbit.load`` as ``lowbit eval`` and ``lowbit export`` do) is exported with
``lowbit.export.onnx.export_onnx`` into a temporary directory (runs/ is only read). Both are evaluated
on the same test images: accuracy of each, the difference in points (target: within 0.1), the share of
images whose argmax agrees and whose logits differ at all, the largest absolute difference of the
logits, and the size of the ONNX file next to the run's packed size.

    .venv/bin/python benchmarks/onnx_accuracy.py [RUN ...] [--out benchmarks/results/onnx.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RUNS_DIR, machine_line, markdown_table  # noqa: E402

from lowbit.config import recipe_from_dict  # noqa: E402
from lowbit.export.io import load  # noqa: E402
from lowbit.export.onnx import export_onnx  # noqa: E402
from lowbit.tasks.vision import VisionTask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "onnx.md"
TARGET = 0.1  # accuracy points


def measure(run_dir: Path, tmp: Path) -> dict[str, Any]:
    import onnxruntime as ort

    recipe = recipe_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    data = VisionTask(recipe).data
    int_model = load(run_dir / "model.safetensors")  # the run's integer model, as `lowbit export` exports it
    path = export_onnx(int_model, tmp / f"{run_dir.name}.onnx", data.test_x[:1])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    bs = recipe.data.eval_batch_size
    ref, out = [], []
    with torch.no_grad():
        for i in range(0, data.test_x.shape[0], bs):
            x = data.test_x[i : i + bs]
            ref.append(int_model(x).numpy())
            out.append(sess.run(None, {"input": x.numpy()})[0])
    r, o, y = np.concatenate(ref), np.concatenate(out), data.test_y.numpy()
    acc_int, acc_onnx = 100.0 * float((r.argmax(1) == y).mean()), 100.0 * float((o.argmax(1) == y).mean())
    q = recipe.quant
    summary = run_dir / "summary.json"
    differ = np.abs(r - o).max(axis=1) > 1e-4 * np.abs(r).max()  # a rounding flip somewhere upstream
    return {
        "run": str(run_dir.relative_to(RUNS_DIR.parent)) if run_dir.is_relative_to(RUNS_DIR.parent) else str(run_dir),
        "model": recipe.model.name,
        "bits": f"W{q.weight.bits if q.weight else 32}A{q.act.bits if q.act else 32}",
        "images": int(y.shape[0]),
        "acc_int": acc_int,
        "acc_onnx": acc_onnx,
        "delta": acc_onnx - acc_int,
        "agree": 100.0 * float((r.argmax(1) == o.argmax(1)).mean()),
        "differ": 100.0 * float(differ.mean()),
        "max_diff": float(np.abs(r - o).max()),
        "max_logit": float(np.abs(r).max()),
        "onnx_bytes": path.stat().st_size,
        "lowbit_bytes": json.loads(summary.read_text()).get("quant_bytes", "") if summary.is_file() else "",
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*", type=Path, default=[RUNS_DIR / "default"], metavar="RUN")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    import onnx
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_dir in args.runs:
            m = measure(run_dir.resolve(), Path(tmp))
            print(f"{m['run']}: integer {m['acc_int']:.2f}%, onnx {m['acc_onnx']:.2f}%, max |diff| {m['max_diff']:.2e}")
            rows.append([
                m["run"], m["model"], m["bits"], m["images"], f"{m['acc_int']:.2f}", f"{m['acc_onnx']:.2f}",
                f"{m['delta']:+.2f}", "yes" if abs(m["delta"]) <= TARGET else "no", f"{m['agree']:.2f}",
                f"{m['differ']:.2f}", f"{m['max_diff']:.2e}", f"{m['max_logit']:.2f}", f"{m['onnx_bytes']:,}",
                f"{m['lowbit_bytes']:,}" if m["lowbit_bytes"] != "" else "",
            ])
    header = [
        "run", "model", "bits", "test images", "integer acc %", "ONNX acc %", "Δ points", f"within {TARGET}",
        "argmax agree %", "logits differ %", "max abs diff", "max abs logit", "ONNX bytes", "lowbit bytes",
    ]
    command = " ".join(["python", "benchmarks/onnx_accuracy.py", *map(shlex.quote, argv or sys.argv[1:])])
    text = "\n".join([
        "# ONNX QDQ export vs lowbit's integer model (Fashion-MNIST test set)",
        "",
        f"{datetime.date.today().isoformat()} · {machine_line()} · onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider, default graph optimizations), opset 21",
        "",
        f"`{command}`",
        "",
        "Accuracy of both on the same images; *logits differ*: images whose largest logit difference exceeds "
        "1e-4 of the largest logit (an activation one rounding step away, see `lowbit/export/onnx.py`); "
        "*lowbit bytes*: the run's `quant_bytes` (packed weights, scales, BatchNorm; no graph). ONNX has no "
        "3-bit type, so 3-bit weights are stored as INT4 and a W3A3 file is as large as a W4A4 one.",
        "",
        markdown_table(header, rows, "lllrrrrlrrrrrr"),
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
