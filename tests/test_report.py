"""The run report: valid PNGs, a self-contained HTML page, escaping, and runs with missing pieces."""

from __future__ import annotations

import base64
import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from lowbit.cli import main
from lowbit.errors import ConfigError
from lowbit.report import write_report

EDGES = [0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
LAYERS = {"features.0.0": 216, "features.1.conv.0.0": 288, "features.2.conv.1.0": 864, "classifier.1": 12800}
SUMMARY = {
    "recipe": "w4a4_osc", "dataset": "fashion_mnist", "model": "mobilenetv2", "metric_name": "accuracy",
    "float_metric": 90.7, "quant_metric": 88.9, "qat_metric": 88.4, "weight_bits": 4, "act_bits": 4,
    "first_last_bits": 8, "float_bytes": 208040, "quant_bytes": 52196, "num_parameters": 49226,
    "train_seconds": 56.7, "qat_seconds": 51.9, "torch_threads": 2, "methods": ["oscillation_freeze"],
}


def oscillation(epoch: int, rng: np.random.Generator) -> dict:
    layers = {}
    for i, (name, n) in enumerate(LAYERS.items()):
        hist = rng.multinomial(n, np.array([60, 10, 8, 6, 5, 4, 3, 2, 1, 1]) / 100).tolist()
        layers[name] = {"bits": 8 if name in ("features.0.0", "classifier.1") else 4, "numel": n,
                        "oscillating": sum(hist[4:]) / n, "frozen": 0.001 * i * epoch, "hist": hist}
    total = sum(LAYERS.values())
    overall = {f: sum(v[f] * v["numel"] for v in layers.values()) / total for f in ("oscillating", "frozen")}
    return {"threshold": 0.01, **overall, "hist_edges": EDGES, "layers": layers}


def make_run(root: Path, *, osc: bool = True, finished: bool = True, recipe: str = "w4a4_osc") -> Path:
    """A run directory as `lowbit train` writes it: 3 pre-training epochs, 4 QAT epochs, a final row."""
    run, rng = root / "run", np.random.default_rng(0)
    run.mkdir(parents=True)
    rows: list[dict] = [{"stage": "float", "step": 0, "test_accuracy": 90.7, "test_loss": 0.27}]
    for e in range(1, 4):
        rows.append({"stage": "pretrain", "step": 469 * e, "epoch": float(e), "test_accuracy": 84 + 2 * e,
                     "test_loss": 0.5 - 0.06 * e, "train_loss": 0.6 - 0.07 * e})
    for e in range(1, 5):
        row = {"stage": "qat", "step": 469 * e, "epoch": float(e), "test_accuracy": 86 + 0.7 * e,
               "test_loss": 0.36 - 0.01 * e, "train_loss": 0.38 - 0.01 * e}
        if osc:
            row["oscillation"] = oscillation(e, rng)
        rows.append(row)
    if finished:
        rows.append({"stage": "final", "step": 1876, "test_accuracy": 88.9, "test_loss": 0.31,
                     "before_finish_accuracy": 88.4})
        (run / "summary.json").write_text(json.dumps({**SUMMARY, "recipe": recipe}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    methods = "methods:\n- {name: oscillation_freezing}\n" if osc else ""
    (run / "config.yaml").write_text(f"name: {json.dumps(recipe)}\nseed: 0\nquant:\n  weight: {{bits: 4}}\n{methods}")
    return run


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        self.links += [v for k, v in attrs if k in ("src", "href") and v and tag != "img"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Page:
    p = Page()
    p.feed(path.read_text())
    p.close()
    return p


def check_page(html_path: Path) -> Page:
    page = parse(html_path)
    raw = html_path.read_text()
    assert "http://" not in raw and "https://" not in raw and "<script" not in raw.lower()
    assert page.links == []
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        w, h = png_size(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert w >= 600 and h >= 250
    return page


def test_full_run_with_oscillation(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    assert pngs == ["accuracy.png", "loss.png", "osc_hist.png", "oscillation.png"]
    for p in (run / "plots").glob("*.png"):
        png_size(p.read_bytes())
    page = check_page(out)
    assert len(page.imgs) == 4
    text = " ".join(page.text)
    for s in ("90.70%", "88.90%", "88.40%", "-1.80 points", "208,040", "52,196", "4.0x smaller", "49,226",
              "W4A4", "8-bit", "oscillation_freeze", "features.2.conv.1.0", "12,800", "w4a4_osc"):
        assert s in text, s
    assert "seed: 0" in text  # the config
    assert not list(run.glob(".*tmp*")) and not list((run / "plots").glob(".*tmp*"))


def test_png_decodes_with_pil(tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    run = make_run(tmp_path)
    write_report(run)
    for p in (run / "plots").glob("*.png"):
        with image.open(p) as im:
            im.verify()
            assert im.size == png_size(p.read_bytes())


def test_recipe_name_is_escaped(tmp_path: Path) -> None:
    run = make_run(tmp_path, recipe="<script>alert(1)</script>")
    raw = write_report(run).read_text()
    assert "<script>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "script" not in parse(run / "report.html").tags


def test_run_without_oscillation_leaves_those_plots_out(tmp_path: Path) -> None:
    run = make_run(tmp_path, osc=False)
    page = check_page(write_report(run))
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["accuracy.png", "loss.png"]
    assert len(page.imgs) == 2
    text = " ".join(page.text)
    assert "Oscillation per layer" not in text and "no oscillation" not in text.lower()  # no method, no empty section


def test_a_method_named_without_data_says_so(tmp_path: Path) -> None:
    run = make_run(tmp_path, osc=False)
    (run / "config.yaml").write_text("name: r\nmethods:\n- {name: oscillation_tracking}\n")
    page = check_page(write_report(run))
    assert "no oscillation plot" in " ".join(page.text).lower()


def test_perplexity_run_speaks_perplexity(tmp_path: Path) -> None:
    run = tmp_path / "llm"
    run.mkdir()
    rows = [{"stage": "float", "step": 0, "test_perplexity": 40.0, "test_loss": 3.69, "other_perplexity": 12.0},
            {"stage": "direct", "step": 0, "test_perplexity": 120.0, "test_loss": 4.79, "other_perplexity": 26.0},
            {"stage": "qat", "step": 50, "test_perplexity": 36.0, "test_loss": 3.58, "train_loss": 3.7},
            {"stage": "qat", "step": 100, "test_perplexity": 34.0, "test_loss": 3.53, "train_loss": 3.5},
            {"stage": "final", "step": 100, "test_perplexity": 34.0, "test_loss": 3.53, "other_perplexity": 15.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"recipe": "llm", "dataset": "shakespeare", "model": "smollm2", "metric_name": "perplexity",
               "float_metric": 40.0, "direct_metric": 120.0, "quant_metric": 34.0, "qat_metric": 34.0,
               "weight_bits": 4, "act_bits": 32, "float_bytes": 1000, "quant_bytes": 300, "methods": [],
               "other_corpus": "kjv", "float_other_perplexity": 12.0, "quant_other_perplexity": 15.0,
               "lowrank": {"rank": 32, "alpha": 1.0, "phi": "fixed_point8", "variant": "lrqat", "recompute": True}}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "plots").mkdir()
    (run / "plots" / "accuracy.png").write_bytes(b"stale")  # from an earlier run of this name
    page = check_page(write_report(run))
    text = " ".join(page.text)
    for needle in ("round-to-nearest perplexity (before QAT)", "120.00", "0.85x", "12.00 → 15.00 (1.25x)",
                   "low-rank lrqat rank 32", "W4 (activations float)"):
        assert needle in text, needle
    summary_text = text.split("Summary", 1)[1].split("Plots", 1)[0]
    assert "points" not in summary_text and "%" not in summary_text
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == ["loss.png", "perplexity.png"]


def test_unfinished_run(tmp_path: Path) -> None:
    run = make_run(tmp_path, finished=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "qat", "step": 2345, "epo')  # killed mid-write
    page = check_page(write_report(run))
    text = " ".join(page.text)
    assert "unfinished" in text and "1 unreadable line" in text
    assert "88.80%" in text  # the last QAT evaluation so far
    assert len(page.imgs) == 4


def test_empty_metrics_and_no_config(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    page = check_page(write_report(run))
    assert page.imgs == []
    assert "no evaluations" in " ".join(page.text)


def test_older_run_without_optional_fields(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    rows = [{"stage": "float", "test_accuracy": 90.0}, {"stage": "qat", "step": 10, "test_accuracy": 85.0},
            {"stage": "qat", "step": 20, "test_accuracy": 86.0, "oscillation": {"layers": {"a": {"hist": [1]}}}}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"float_metric": 90.0, "quant_metric": 86.5}))
    page = check_page(write_report(run))
    text = " ".join(page.text)
    assert "90.00%" in text and "+-" not in text and "-3.50 points" in text
    assert (run / "plots" / "accuracy.png").is_file() and not (run / "plots" / "osc_hist.png").exists()


def test_missing_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        write_report(tmp_path / "r")


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path)
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit report: error:") and "missing" in err and "\n" not in err
