"""The oscillation methods' part of a run's report (``OscillationTracking.report``).

From the ``oscillation`` entry each QAT evaluation row carries (``OscillationTracking.metrics``):

    oscillation.png   oscillating / frozen fractions over QAT: overall, top layers, the rest in grey
    osc_hist.png      last QAT evaluation: share of each layer's weights per flip-frequency bin
    a table           per layer: bits, weights, oscillating and frozen shares at the last evaluation
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lowbit.figures import Row, Section, html_table, num
from lowbit.figures import figure as _figure

__all__ = ["oscillation_section", "plot_oscillation", "plot_histogram", "oscillation_table"]

TOP_LAYERS = 6  # layers drawn in colour (and named) in the oscillation-over-time plot
MAX_HEATMAP_LAYERS = 60  # beyond this the heatmap keeps the layers that oscillate most


def _osc(row: Row) -> Row | None:
    o = row.get("oscillation")
    return o if row.get("stage") == "qat" and isinstance(o, dict) else None


def _layers(osc: Row) -> dict[str, Row]:
    layers = osc.get("layers")
    return {str(k): v for k, v in layers.items() if isinstance(v, dict)} if isinstance(layers, dict) else {}


def _last_osc(rows: list[Row]) -> Row | None:
    """The oscillation data of the last QAT evaluation that has per-layer data."""
    return next((o for r in reversed(rows) if (o := _osc(r)) is not None and _layers(o)), None)


def plot_oscillation(rows: list[Row]) -> Figure | str:
    unit = "epoch" if all(num(r.get("epoch")) is not None for r in rows if _osc(r)) else "step"
    pts = [(x, o) for r in rows if (o := _osc(r)) is not None and (x := num(r.get(unit))) is not None]
    fields = ("oscillating", "frozen")
    if not any(num(d.get(f)) is not None for _, o in pts for d in (o, *_layers(o).values()) for f in fields):
        return "no oscillation plot: no QAT evaluation logged oscillation data (the run used no oscillation method)"

    def trace(field: str, name: str | None = None) -> tuple[list[float], list[float]]:  # in %
        xy = [(x, 100 * v) for x, o in pts
              if (v := num((o if name is None else _layers(o).get(name, {})).get(field))) is not None]
        return [x for x, _ in xy], [y for _, y in xy]

    last = _layers(pts[-1][1])
    top = sorted(last, key=lambda n: -(num(last[n].get("oscillating")) or 0.0))[:TOP_LAYERS]
    rest = [n for n in dict.fromkeys(n for _, o in pts for n in _layers(o)) if n not in top]
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2, sharex=True)
    thr = num(pts[-1][1].get("threshold"))
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
    if osc is None or not isinstance(edges, list) or len(edges) < 2 or any(num(e) is None for e in edges):
        return "no oscillation histogram: no QAT evaluation logged per-layer histograms with hist_edges"
    layers = _layers(osc)
    data = {n: h for n, v in layers.items() if isinstance(h := v.get("hist"), list) and len(h) == len(edges) - 1
            and all(num(c) is not None for c in h)}
    data = {n: data[n] for n in sorted(data, key=lambda n: -(num(layers[n].get("oscillating")) or 0.0))
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
    thr = num(osc.get("threshold"))
    if thr is not None and edges[0] <= thr <= edges[-1]:
        ax.axvline(float(np.interp(thr, edges, np.arange(len(edges)))) - 0.5, color="tab:red", lw=1.2, ls="--")
    more = f", {MAX_HEATMAP_LAYERS} layers that oscillate most" if len(layers) > MAX_HEATMAP_LAYERS else ""
    ax.set(xlabel="EMA flip frequency (bin edges; dashed: reporting threshold; blank: no weights)",
           title=f"Share of each layer's weights per flip-frequency bin (last QAT evaluation{more})")
    fig.colorbar(img, ax=ax, label="share of the layer's weights", aspect=max(20, len(data)))
    return fig


def oscillation_table(rows: list[Row]) -> str:
    osc = _last_osc(rows)
    if osc is None:
        return '<p class="note">No per-layer oscillation data: the run used no oscillation method.</p>'

    def pct(v: Any) -> str:
        return "" if num(v) is None else f"{100 * v:.2f}%"

    body = [[n, str(v.get("bits", "")), f"{int(v['numel']):,}" if num(v.get("numel")) is not None else "",
             pct(v.get("oscillating")), pct(v.get("frozen"))] for n, v in _layers(osc).items()]
    body.append(["all layers", "", "", pct(osc.get("oscillating")), pct(osc.get("frozen"))])
    thr = num(osc.get("threshold"))
    note = f"<p>Oscillating: EMA flip frequency above {thr:g}.</p>" if thr is not None else ""
    return note + html_table(["layer", "bits", "weights", "oscillating", "frozen"], body, (1, 2, 3, 4))


def oscillation_section(rows: list[Row]) -> Section:
    return Section(
        "Oscillation per layer (last QAT evaluation)",
        oscillation_table(rows),
        [
            ("oscillation", "Oscillating and frozen weights during QAT.", plot_oscillation(rows)),
            ("osc_hist", "Oscillation frequency per layer at the end of QAT.", plot_histogram(rows)),
        ],
    )
