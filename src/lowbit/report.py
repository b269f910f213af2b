"""The report of a run: plots (PNG) and one self-contained HTML page.

``write_report(run_dir)`` reads ``metrics.jsonl`` (required) and, where present, ``summary.json`` (absent
while a run is unfinished) and ``config.yaml``, and writes into ``run_dir``:

    plots/<metric>.png      the run's metric (accuracy, or perplexity on a log scale), pre-training then
                            QAT; the float model's line; round-to-nearest and the final integer marker
    plots/loss.png          test loss, and train loss where logged
    plots/<method plots>    what each method of the run contributes (oscillation: oscillation.png,
                            osc_hist.png)
    report.html             summary, each method's section, plots as base64 data: URIs, the config;
                            inline CSS, no external URL, everything from files HTML-escaped

The summary speaks the run's metric: accuracy changes in points, perplexity as a ratio to the float
model's (lower is better), with the other corpus beside it for language models. Each method named in
the run's config contributes its own section through its ``report(rows)`` hook (``lowbit.methods``);
this module knows no method's schema. Optional data may be missing (older or unfinished runs, a line
cut off by a kill): that plot or section is left out and the page says why. Files are written to a
temporary name and moved into place. Figures use ``Figure`` + the Agg canvas, never pyplot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure

from lowbit.checkpoint import atomic_write_text
from lowbit.errors import ConfigError
from lowbit.figures import Row, Section, html_table, num
from lowbit.figures import figure as _figure
from lowbit.validate import parse_yaml

__all__ = ["write_report"]

log = logging.getLogger(__name__)

STAGES = {"pretrain": ("pre-training", "tab:blue"), "qat": ("QAT", "tab:orange")}
CSS = """body{font:16px/1.4 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;margin-top:1.6em}
.sub,.note,figcaption{color:#666}.note{font-style:italic}figure{margin:1em 0}figcaption{font-size:.9em}
table{border-collapse:collapse;margin:.5em 0;font-size:.95em}th{background:#f5f5f5}
th,td{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
.n{text-align:right;font-variant-numeric:tabular-nums}img{width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.85em;border:1px solid #eee}"""


def read_metrics(path: Path) -> tuple[list[Row], int]:
    """The rows of ``metrics.jsonl`` and how many lines could not be read (e.g. one cut off by a kill)."""
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows += [row] if row else []
        else:
            bad += 1
    return rows, bad


class _Axis:
    """x positions: epochs if every training row has one, else steps; QAT continues after pre-training."""

    def __init__(self, rows: list[Row]) -> None:
        train = [r for r in rows if r.get("stage") in STAGES]
        self.unit = "epoch" if train and all(num(r.get("epoch")) is not None for r in train) else "step"
        pre = [x for r in train if r.get("stage") == "pretrain" and (x := num(r.get(self.unit))) is not None]
        self.offset = max(pre, default=0.0)
        self.label = f"{self.unit} (pre-training, then QAT)" if self.offset else self.unit

    def series(self, rows: list[Row], stage: str, key: str) -> tuple[list[float], list[float]]:
        shift = self.offset if stage == "qat" else 0.0
        raw = [(num(r.get(self.unit)), num(r.get(key))) for r in rows if r.get("stage") == stage]
        pts = sorted((x + shift, y) for x, y in raw if x is not None and y is not None)
        return [x for x, _ in pts], [y for _, y in pts]

    def finish(self, ax: Any, ylabel: str, title: str) -> None:
        if self.offset:
            ax.axvline(self.offset, color="#999", lw=0.8, ls=":")
            ax.annotate("QAT →", (self.offset, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                        textcoords="offset points", color="#777", fontsize=8)
        ax.set(xlabel=self.label, ylabel=ylabel, title=title)
        ax.margins(y=0.08)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def plot_metric(rows: list[Row], summary: Row, metric: str) -> Figure | str:
    axis, key = _Axis(rows), f"test_{metric}"
    first = next((r for r in rows if r.get("stage") == "float"), None)
    last = next((r for r in reversed(rows) if r.get("stage") == "final"), None)
    ref = num(first.get(key)) if first else num(summary.get("float_metric"))
    direct = next((num(r.get(key)) for r in rows if r.get("stage") == "direct"), num(summary.get("direct_metric")))
    final = num(last.get(key)) if last else num(summary.get("quant_metric"))
    before = num(last.get(f"before_finish_{metric}")) if last else num(summary.get("qat_metric"))
    curves = {s: axis.series(rows, s, key) for s in STAGES}
    if not any(xs for xs, _ in curves.values()):
        return f"no {metric} plot: metrics.jsonl has no test_{metric} of pre-training or QAT yet"
    fig = _figure(9, 4.2)
    ax = fig.add_subplot()
    for stage, (xs, ys) in curves.items():
        if xs:
            ax.plot(xs, ys, marker="o", ms=4, color=STAGES[stage][1], label=STAGES[stage][0])
    if ref is not None:
        ax.axhline(ref, color="#555", ls="--", lw=1, label=f"float model ({ref:.2f})")
    if direct is not None:
        ax.axhline(direct, color="tab:purple", ls=":", lw=1, label=f"round-to-nearest, before QAT ({direct:.2f})")
    end = max(xs[-1] for xs, _ in curves.values() if xs)
    if before is not None:
        ax.plot([end], [before], "o", mfc="none", mec="tab:red", ms=9, label=f"fake-quant before finish ({before:.2f})")
    if final is not None:
        ax.plot([end], [final], "*", color="tab:red", ms=14, label=f"integer model, final ({final:.2f})")
    if metric == "perplexity":
        ax.set_yscale("log")
    unit = " (%)" if metric == "accuracy" else " (held out, log scale; lower is better)"
    axis.finish(ax, f"test {metric}{unit}", f"Test {metric}")
    return fig


def plot_loss(rows: list[Row]) -> Figure | str:
    axis = _Axis(rows)
    lines = [(s, k, axis.series(rows, s, k)) for k in ("test_loss", "train_loss") for s in STAGES]
    if not any(xs for _, _, (xs, _) in lines):
        return "no loss plot: metrics.jsonl has no test_loss or train_loss of pre-training or QAT yet"
    fig = _figure(9, 4.2)
    ax = fig.add_subplot()
    for stage, key, (xs, ys) in lines:
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, ls="-" if key == "test_loss" else "--", color=STAGES[stage][1],
                    label=f"{STAGES[stage][0]} {key.replace('_', ' ')}")
    ref = next((num(r.get("test_loss")) for r in rows if r.get("stage") == "float"), None)
    if ref is not None:
        ax.axhline(ref, color="#555", ls="--", lw=1, label=f"float model test loss ({ref:.3f})")
    axis.finish(ax, "loss", "Loss")
    return fig


def summary_rows(s: Row, rows: list[Row], metric: str) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary table: what the run recorded, or the evaluations so far."""
    key, pct = f"test_{metric}", "%" if metric == "accuracy" else ""

    def stage_value(stage: str, field: str = key) -> float | None:
        return next((num(r.get(field)) for r in rows if r.get("stage") == stage), None)

    fm = num(s.get("float_metric"))
    fm = stage_value("float") if fm is None else fm
    dm = num(s.get("direct_metric"))
    dm = stage_value("direct") if dm is None else dm
    qm, qlabel = num(s.get("quant_metric")), f"quantized (integer) {metric}"
    last = next((r for r in reversed(rows) if r.get("stage") == "qat" and num(r.get(key)) is not None), None)
    if qm is None and last is not None:  # unfinished run: the last QAT evaluation so far
        at = f"epoch {last['epoch']:g}" if num(last.get("epoch")) is not None else f"step {last.get('step', '?')}"
        qm, qlabel = num(last[key]), f"fake-quant {metric} so far (QAT {at})"
    qat = num(s.get("qat_metric"))
    w, a, fl = (s.get(k) for k in ("weight_bits", "act_bits", "first_last_bits"))
    fb, qb, ts, qs = (num(s.get(k)) for k in ("float_bytes", "quant_bytes", "train_seconds", "qat_seconds"))
    n = num(s.get("trainable_parameters", s.get("num_parameters")))
    lowrank = s.get("lowrank") if isinstance(s.get("lowrank"), dict) else None
    methods = s.get("methods")
    if fm is None or qm is None:
        change = None
    elif metric == "accuracy":
        change = ("change", f"{qm - fm:+.2f} points")
    else:
        change = ("integer / float perplexity", f"{qm / fm:.2f}x" if fm else "")
    fo, qo = num(s.get("float_other_perplexity")), num(s.get("quant_other_perplexity"))
    bits = None
    nominal = s.get("nominal_bits") if isinstance(s.get("nominal_bits"), dict) else {}
    if w and a:
        nw, na = nominal.get("weight", w), nominal.get("act", a)
        bits = f"W{nw}" + (f"A{na}" if na != 32 else " (activations float)")
        if (nw, na) != (w, a):
            bits += f"; as used, the mean over layers: W{w}" + (f"A{a}" if a != 32 else "")
        bits += f", first/last layers {fl}-bit" if fl is not None else ""
        bits += f", low-rank {lowrank.get('variant')} rank {lowrank.get('rank')}" if lowrank else ""
    out = [
        ("model / dataset", f"{s.get('model', '?')} / {s.get('dataset', '?')}" if "model" in s else None),
        ("bits", bits),
        (f"float {metric}", f"{fm:.2f}{pct}" if fm is not None else None),
        (f"round-to-nearest {metric} (before QAT)", f"{dm:.2f}{pct}" if dm is not None else None),
        (f"fake-quant {metric}, end of QAT", f"{qat:.2f}{pct}" if qat is not None else None),
        (qlabel, f"{qm:.2f}{pct}" if qm is not None else None),
        change,
        (f"other corpus ({s.get('other_corpus', '?')}) perplexity: float → integer",
         f"{fo:.2f} → {qo:.2f} ({qo / fo:.2f}x)" if fo and qo is not None else None),
        ("float size", f"{int(fb):,} bytes" if fb is not None else None),
        ("quantized size", f"{int(qb):,} bytes" + (f" ({fb / qb:.1f}x smaller)" if fb and qb else "")
         if qb is not None else None),
        ("trained parameters", f"{int(n):,}" if n is not None else None),
        ("methods", ", ".join(map(str, methods)) or "none" if isinstance(methods, list) else None),
        ("time", f"{ts:.0f} s" + (f" (QAT {qs:.0f} s)" if qs is not None else "")
         + (f", {s['torch_threads']} threads" if s.get("torch_threads") else "") if ts is not None else None),
    ]  # fmt: skip
    return [r for r in out if r is not None and r[1] is not None]  # type: ignore[misc]


def method_sections(config: Any, rows: list[Row], notes: list[str]) -> list[Section]:
    """The sections the run's methods (named in its config) contribute through their ``report`` hooks."""
    from lowbit.methods import build_methods

    specs = config.get("methods") if isinstance(config, dict) else None
    if not isinstance(specs, list) or not specs:
        return []
    try:
        methods = build_methods(specs, total_steps=1)
    except ConfigError as e:
        notes.append(f"The run's methods could not be rebuilt for their report sections: {e}")
        return []
    sections: dict[str, Section] = {}
    for m in methods:
        hook = getattr(m, "report", None)
        if callable(hook):
            section = hook(rows)
            sections.setdefault(section.title, section)  # oscillation methods share one section
    return list(sections.values())


def _read(path: Path, parse: Any, notes: list[str]) -> Any:
    """``parse(text)`` of ``path``, or None when absent or unreadable (noted for the page)."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(errors="replace"))
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        notes.append(f"{path.name} could not be read: {(str(e).splitlines() or [type(e).__name__])[0]}")
        return None


def _write_png(fig: Figure, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return buf.getvalue()


def _figure_html(run_dir: Path, stem: str, caption: str, made: Figure | str) -> str:
    """The figure written to ``plots/<stem>.png`` and inlined, or the note saying why it is left out."""
    if isinstance(made, str):
        log.debug("report: %s", made)
        return f'<p class="note">{html.escape(made[0].upper() + made[1:])}.</p>'
    uri = "data:image/png;base64," + base64.b64encode(_write_png(made, run_dir / "plots" / f"{stem}.png")).decode()
    return (f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>")  # fmt: skip


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/plots/*.png`` and ``run_dir/report.html`` from what the run holds; returns the HTML path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        what = "does not exist" if not run_dir.is_dir() else "has no metrics.jsonl"
        raise ConfigError(f"run directory {str(run_dir)!r} {what}: pass a directory written by `lowbit train`")
    rows, bad = read_metrics(run_dir / "metrics.jsonl")
    notes = [f"{bad} unreadable line(s) in metrics.jsonl were skipped."] if bad else []
    notes += [] if rows else ["metrics.jsonl holds no evaluations yet."]
    summary = _read(run_dir / "summary.json", json.loads, notes)
    if summary is None and not (run_dir / "summary.json").exists():
        notes.append("The run is unfinished (no summary.json yet): this report shows the evaluations so far.")
    summary = summary if isinstance(summary, dict) else {}
    config_text = _read(run_dir / "config.yaml", str, notes) or ""
    config = _read(run_dir / "config.yaml", lambda text: parse_yaml(text, "config.yaml"), [])
    name = summary.get("recipe") or (config.get("name") if isinstance(config, dict) else None) or run_dir.name
    metric = str(summary.get("metric_name") or "accuracy")

    (run_dir / "plots").mkdir(exist_ok=True)
    # a plot left from an earlier run of another kind (accuracy.png beside perplexity.png) would mislead
    other = {"accuracy": "perplexity", "perplexity": "accuracy"}.get(metric)
    if other:
        (run_dir / "plots" / f"{other}.png").unlink(missing_ok=True)
    main = [(metric, f"Test {metric} during training.", plot_metric(rows, summary, metric)),
            ("loss", "Loss during training.", plot_loss(rows))]  # fmt: skip
    sections = method_sections(config, rows, notes)
    parts = []
    for section in sections:
        parts += [f"<h2>{html.escape(section.title)}</h2>", section.html]
        parts += [_figure_html(run_dir, *f) for f in section.figures]

    title = html.escape(f"lowbit report: {name}")
    page = "\n".join([
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>',
        f"<style>\n{CSS}\n</style></head><body>\n<h1>{title}</h1>",
        f'<p class="sub">run directory: {html.escape(str(run_dir))}</p>',
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        "<h2>Summary</h2>", html_table([], [list(r) for r in summary_rows(summary, rows, metric)], (1,)),
        "<h2>Plots</h2>", *(_figure_html(run_dir, *f) for f in main),
        *parts,
        "<h2>Resolved config (config.yaml)</h2>",
        f"<pre>{html.escape(config_text)}</pre>" if config_text else '<p class="note">No config.yaml in the run.</p>',
        "</body></html>\n",
    ])  # fmt: skip
    atomic_write_text(run_dir / "report.html", page)
    log.debug("report written to %s", run_dir / "report.html")
    return run_dir / "report.html"
