"""The report of a run: plots (PNG) and one self-contained HTML page.

``write_report(run_dir)`` reads ``metrics.jsonl`` (required) and, where present, ``summary.json`` (absent
while a run is unfinished) and ``config.yaml``, and writes into ``run_dir``:

    plots/accuracy.png      test accuracy, pre-training then QAT; float accuracy line; final integer marker
    plots/loss.png          test loss, and train loss where logged
    plots/oscillation.png   oscillating / frozen fractions over QAT: overall, top layers, the rest in grey
    plots/osc_hist.png      last QAT evaluation: share of each layer's weights per flip-frequency bin
    report.html             summary, per-layer oscillation table, plots as base64 data: URIs, the config;
                            inline CSS, no external URL, everything from files HTML-escaped

Optional data may be missing (older or unfinished runs, no oscillation method, a line cut off by a kill):
that plot or section is left out and the page says why. Files are written to a temporary name and moved
into place. Figures use ``Figure`` + the Agg canvas, never pyplot, so matplotlib's global state is untouched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lowbit.checkpoint import atomic_write_text
from lowbit.errors import ConfigError

__all__ = ["write_report"]

log = logging.getLogger(__name__)

Row = dict[str, Any]
TOP_LAYERS = 6  # layers drawn in colour (and named) in the oscillation-over-time plot
MAX_HEATMAP_LAYERS = 60  # beyond this the heatmap keeps the layers that oscillate most
STAGES = {"pretrain": ("pre-training", "tab:blue"), "qat": ("QAT", "tab:orange")}
CSS = """body{font:16px/1.4 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;border-bottom:1px solid #ddd;margin-top:1.6em}
.sub,.note,figcaption{color:#666}.note{font-style:italic}figure{margin:1em 0}figcaption{font-size:.9em}
table{border-collapse:collapse;margin:.5em 0;font-size:.95em}th{background:#f5f5f5}
th,td{padding:.25em .8em;border-bottom:1px solid #eee;text-align:left}
.n{text-align:right;font-variant-numeric:tabular-nums}img{width:100%;height:auto;border:1px solid #eee}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.85em;border:1px solid #eee}"""


def _num(v: Any) -> float | None:
    """``v`` as a finite float, or None (missing, not a number, NaN)."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


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


def _osc(row: Row) -> Row | None:
    o = row.get("oscillation")
    return o if row.get("stage") == "qat" and isinstance(o, dict) else None


def _layers(osc: Row) -> dict[str, Row]:
    layers = osc.get("layers")
    return {str(k): v for k, v in layers.items() if isinstance(v, dict)} if isinstance(layers, dict) else {}


def _last_osc(rows: list[Row]) -> Row | None:
    """The oscillation data of the last QAT evaluation that has per-layer data."""
    return next((o for r in reversed(rows) if (o := _osc(r)) is not None and _layers(o)), None)


class _Axis:
    """x positions: epochs if every training row has one, else steps; QAT continues after pre-training."""

    def __init__(self, rows: list[Row]) -> None:
        train = [r for r in rows if r.get("stage") in STAGES]
        self.unit = "epoch" if train and all(_num(r.get("epoch")) is not None for r in train) else "step"
        pre = [x for r in train if r.get("stage") == "pretrain" and (x := _num(r.get(self.unit))) is not None]
        self.offset = max(pre, default=0.0)
        self.label = f"{self.unit} (pre-training, then QAT)" if self.offset else self.unit

    def series(self, rows: list[Row], stage: str, key: str) -> tuple[list[float], list[float]]:
        shift = self.offset if stage == "qat" else 0.0
        raw = [(_num(r.get(self.unit)), _num(r.get(key))) for r in rows if r.get("stage") == stage]
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


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(rows: list[Row], summary: Row, metric: str) -> Figure | str:
    axis, key = _Axis(rows), f"test_{metric}"
    first = next((r for r in rows if r.get("stage") == "float"), None)
    last = next((r for r in reversed(rows) if r.get("stage") == "final"), None)
    ref = _num(first.get(key)) if first else _num(summary.get("float_metric"))
    final = _num(last.get(key)) if last else _num(summary.get("quant_metric"))
    before = _num(last.get(f"before_finish_{metric}")) if last else _num(summary.get("qat_metric"))
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
    end = max(xs[-1] for xs, _ in curves.values() if xs)
    if before is not None:
        ax.plot([end], [before], "o", mfc="none", mec="tab:red", ms=9, label=f"fake-quant before finish ({before:.2f})")
    if final is not None:
        ax.plot([end], [final], "*", color="tab:red", ms=14, label=f"integer model, final ({final:.2f})")
    axis.finish(ax, f"test {metric}" + (" (%)" if metric == "accuracy" else ""), f"Test {metric}")
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
    ref = next((_num(r.get("test_loss")) for r in rows if r.get("stage") == "float"), None)
    if ref is not None:
        ax.axhline(ref, color="#555", ls="--", lw=1, label=f"float model test loss ({ref:.3f})")
    axis.finish(ax, "loss", "Loss")
    return fig


def plot_oscillation(rows: list[Row]) -> Figure | str:
    unit = "epoch" if all(_num(r.get("epoch")) is not None for r in rows if _osc(r)) else "step"
    pts = [(x, o) for r in rows if (o := _osc(r)) is not None and (x := _num(r.get(unit))) is not None]
    fields = ("oscillating", "frozen")
    if not any(_num(d.get(f)) is not None for _, o in pts for d in (o, *_layers(o).values()) for f in fields):
        return "no oscillation plot: no QAT evaluation logged oscillation data (the run used no oscillation method)"

    def trace(field: str, name: str | None = None) -> tuple[list[float], list[float]]:  # in %
        xy = [(x, 100 * v) for x, o in pts
              if (v := _num((o if name is None else _layers(o).get(name, {})).get(field))) is not None]
        return [x for x, _ in xy], [y for _, y in xy]

    last = _layers(pts[-1][1])
    top = sorted(last, key=lambda n: -(_num(last[n].get("oscillating")) or 0.0))[:TOP_LAYERS]
    rest = [n for n in dict.fromkeys(n for _, o in pts for n in _layers(o)) if n not in top]
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True)
    thr = _num(pts[-1][1].get("threshold"))
    for ax, field in zip(axes, fields, strict=True):
        for name in rest:
            ax.plot(*trace(field, name), color="#bbb", lw=0.6)
        for i, name in enumerate(top):
            ax.plot(*trace(field, name), color=f"C{i}", lw=1.2, marker=".", ms=4, label=name)
        ax.plot(*trace(field), color="k", lw=2.2, marker="o", ms=3, label="all layers")
        title = f"Oscillating weights (EMA flip frequency > {thr:g})" if field == "oscillating" and thr else None
        ax.set(xlabel=f"QAT {unit}", ylabel=f"{field} weights (%)", title=title or f"{field.capitalize()} weights")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8, title_fontsize=8,
               title="layers" + (f" (+{len(rest)} grey)" if rest else ""))
    return fig


def plot_histogram(rows: list[Row]) -> Figure | str:
    osc = _last_osc(rows)
    edges = osc.get("hist_edges") if osc else None
    if osc is None or not isinstance(edges, list) or len(edges) < 2 or any(_num(e) is None for e in edges):
        return "no oscillation histogram: no QAT evaluation logged per-layer histograms with hist_edges"
    layers = _layers(osc)
    data = {n: h for n, v in layers.items() if isinstance(h := v.get("hist"), list) and len(h) == len(edges) - 1
            and all(_num(c) is not None for c in h)}
    data = {n: data[n] for n in sorted(data, key=lambda n: -(_num(layers[n].get("oscillating")) or 0.0))
            [:MAX_HEATMAP_LAYERS]} if len(data) > MAX_HEATMAP_LAYERS else data
    counts = np.array(list(data.values()), dtype=float).reshape(len(data), len(edges) - 1)  # (layers, bins)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    if not (share > 0).any():
        return "no oscillation histogram: the per-layer histograms are empty or do not match hist_edges"
    fig = _figure(9, max(2.8, 0.26 * len(data) + 1.6))
    ax = fig.add_subplot()
    img = ax.imshow(np.ma.masked_equal(share, 0), aspect="auto", interpolation="nearest", cmap="viridis",
                    norm=LogNorm(vmin=min(share[share > 0].min(), 0.01), vmax=1.0))
    ax.set_yticks(range(len(data)), list(data), fontsize=8)
    ax.set_xticks(np.arange(len(edges)) - 0.5, [f"{e:g}" for e in edges], fontsize=8, rotation=45)
    thr = _num(osc.get("threshold"))
    if thr is not None and edges[0] <= thr <= edges[-1]:
        ax.axvline(float(np.interp(thr, edges, np.arange(len(edges)))) - 0.5, color="tab:red", lw=1.2, ls="--")
    more = f", {MAX_HEATMAP_LAYERS} layers that oscillate most" if len(layers) > MAX_HEATMAP_LAYERS else ""
    ax.set(xlabel="EMA flip frequency (bin edges; dashed: reporting threshold; blank: no weights)",
           title=f"Share of each layer's weights per flip-frequency bin (last QAT evaluation{more})")
    fig.colorbar(img, ax=ax, label="share of the layer's weights", aspect=max(20, len(data)))
    return fig


def summary_rows(s: Row, rows: list[Row], metric: str) -> list[tuple[str, str]]:
    """(label, value) pairs of the summary table: what the run recorded, or the evaluations so far."""
    key, pct = f"test_{metric}", "%" if metric == "accuracy" else ""
    fm = _num(s.get("float_metric"))
    fm = next((_num(r.get(key)) for r in rows if r.get("stage") == "float"), None) if fm is None else fm
    qm, qlabel = _num(s.get("quant_metric")), f"quantized (integer) {metric}"
    last = next((r for r in reversed(rows) if r.get("stage") == "qat" and _num(r.get(key)) is not None), None)
    if qm is None and last is not None:  # unfinished run: the last QAT evaluation so far
        at = f"epoch {last['epoch']:g}" if _num(last.get("epoch")) is not None else f"step {last.get('step', '?')}"
        qm, qlabel = _num(last[key]), f"fake-quant {metric} so far (QAT {at})"
    qat = _num(s.get("qat_metric"))
    w, a, fl = (s.get(k) for k in ("weight_bits", "act_bits", "first_last_bits"))
    fb, qb, n, ts, qs = (_num(s.get(k)) for k in
                         ("float_bytes", "quant_bytes", "num_parameters", "train_seconds", "qat_seconds"))
    methods = s.get("methods")
    out = [
        ("model / dataset", f"{s.get('model', '?')} / {s.get('dataset', '?')}" if "model" in s else None),
        ("bits", f"W{w}A{a}" + (f", first/last layers {fl}-bit" if fl is not None else "") if w and a else None),
        (f"float {metric}", f"{fm:.2f}{pct}" if fm is not None else None),
        (f"fake-quant {metric}, end of QAT", f"{qat:.2f}{pct}" if qat is not None else None),
        (qlabel, f"{qm:.2f}{pct}" if qm is not None else None),
        ("change", f"{qm - fm:+.2f} points" if fm is not None and qm is not None else None),
        ("float size", f"{int(fb):,} bytes" if fb is not None else None),
        ("quantized size", f"{int(qb):,} bytes" + (f" ({fb / qb:.1f}x smaller)" if fb and qb else "")
         if qb is not None else None),
        ("parameters", f"{int(n):,}" if n is not None else None),
        ("methods", ", ".join(map(str, methods)) or "none" if isinstance(methods, list) else None),
        ("time", f"{ts:.0f} s" + (f" (QAT {qs:.0f} s)" if qs is not None else "")
         + (f", {s['torch_threads']} threads" if s.get("torch_threads") else "") if ts is not None else None),
    ]
    return [(k, v) for k, v in out if v is not None]


def _table(head: list[str], body: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}{' class=n' * (i in numeric)}>{html.escape(c)}</{tag}>" for i, c in enumerate(row))

    return "<table>" + (f"<tr>{cells('th', head)}</tr>" if head else "") + "".join(
        f"<tr>{cells('td', r)}</tr>" for r in body) + "</table>"


def oscillation_table(rows: list[Row]) -> str:
    osc = _last_osc(rows)
    if osc is None:
        return '<p class="note">No per-layer oscillation data: the run used no oscillation method.</p>'

    def pct(v: Any) -> str:
        return "" if _num(v) is None else f"{100 * v:.2f}%"

    body = [[n, str(v.get("bits", "")), f"{int(v['numel']):,}" if _num(v.get("numel")) is not None else "",
             pct(v.get("oscillating")), pct(v.get("frozen"))] for n, v in _layers(osc).items()]
    body.append(["all layers", "", "", pct(osc.get("oscillating")), pct(osc.get("frozen"))])
    thr = _num(osc.get("threshold"))
    note = f"<p>Oscillating: EMA flip frequency above {thr:g}.</p>" if thr is not None else ""
    return note + _table(["layer", "bits", "weights", "oscillating", "frozen"], body, (1, 2, 3, 4))


def _read(path: Path, parse: Any, notes: list[str]) -> Any:
    """``parse(text)`` of ``path``, or None when absent or unreadable (noted for the page)."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text(errors="replace"))
    except (ValueError, yaml.YAMLError) as e:
        notes.append(f"{path.name} could not be read: {str(e).splitlines()[0]}")
        return None


def _write_png(fig: Figure, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return buf.getvalue()


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
    config = _read(run_dir / "config.yaml", yaml.safe_load, [])
    name = summary.get("recipe") or (config.get("name") if isinstance(config, dict) else None) or run_dir.name
    metric = str(summary.get("metric_name") or "accuracy")

    (run_dir / "plots").mkdir(exist_ok=True)
    figures = []
    for stem, caption, made in (
        ("accuracy", f"Test {metric} during training.", plot_accuracy(rows, summary, metric)),
        ("loss", "Loss during training.", plot_loss(rows)),
        ("oscillation", "Oscillating and frozen weights during QAT.", plot_oscillation(rows)),
        ("osc_hist", "Oscillation frequency per layer at the end of QAT.", plot_histogram(rows)),
    ):
        if isinstance(made, str):
            log.debug("report: %s", made)
            figures.append(f'<p class="note">{html.escape(made[0].upper() + made[1:])}.</p>')
            continue
        uri = "data:image/png;base64," + base64.b64encode(_write_png(made, run_dir / "plots" / f"{stem}.png")).decode()
        figures.append(f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                       "</figcaption></figure>")

    title = html.escape(f"lowbit report: {name}")
    page = "\n".join([
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>',
        f"<style>\n{CSS}\n</style></head><body>\n<h1>{title}</h1>",
        f'<p class="sub">run directory: {html.escape(str(run_dir))}</p>',
        *(f'<p class="note">{html.escape(n)}</p>' for n in notes),
        "<h2>Summary</h2>", _table([], [list(r) for r in summary_rows(summary, rows, metric)], (1,)),
        "<h2>Oscillation per layer (last QAT evaluation)</h2>", oscillation_table(rows),
        "<h2>Plots</h2>", *figures,
        "<h2>Resolved config (config.yaml)</h2>",
        f"<pre>{html.escape(config_text)}</pre>" if config_text else '<p class="note">No config.yaml in the run.</p>',
        "</body></html>\n",
    ])
    atomic_write_text(run_dir / "report.html", page)
    log.debug("report written to %s", run_dir / "report.html")
    return run_dir / "report.html"
