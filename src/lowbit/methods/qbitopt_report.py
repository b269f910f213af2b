"""Bit reallocation's part of a run's report (``QBitOpt.report``).

From the ``qbitopt`` entry each QAT evaluation row carries (``QBitOpt.metrics``): every allocation since
the previous row, and the widths and budget use at the row.

    qbitopt_bits.png   layers × allocations heat map of weight bit widths
    a table            per layer: weights' final width, its sensitivity c_l at the last allocation
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from lowbit.figures import Row, Section, html_table, num
from lowbit.figures import figure as _figure

__all__ = ["qbitopt_section", "allocations", "plot_bits"]

MAX_LABELLED_LAYERS = 80  # beyond this the heat map's layer names are left out


def allocations(rows: list[Row]) -> list[Row]:
    """Every allocation logged in the QAT rows, in order."""
    out = []
    for r in rows:
        q = r.get("qbitopt")
        if r.get("stage") == "qat" and isinstance(q, dict) and isinstance(q.get("allocations"), list):
            out += [a for a in q["allocations"] if isinstance(a, dict) and isinstance(a.get("bits"), dict)]
    return out


def plot_bits(allocs: list[Row]) -> Figure | str:
    if not allocs:
        return "no bit-width plot: no QAT evaluation logged an allocation"
    layers = list(dict.fromkeys(str(n) for a in allocs for n in a["bits"]))
    grid = np.full((len(layers), len(allocs)), np.nan)
    for j, a in enumerate(allocs):
        for i, n in enumerate(layers):
            b = num(a["bits"].get(n))
            grid[i, j] = b if b is not None else np.nan
    widths = sorted({int(v) for v in grid[np.isfinite(grid)]})
    if not widths:
        return "no bit-width plot: the logged allocations hold no widths"
    cmap = ListedColormap([_colour(k, len(widths)) for k in range(len(widths))])
    bounds = [widths[0] - 0.5] + [(a + b) / 2 for a, b in zip(widths, widths[1:], strict=False)] + [widths[-1] + 0.5]
    fig = _figure(min(4 + 0.25 * len(allocs), 12), min(1.6 + 0.16 * len(layers), 22))
    ax = fig.add_subplot()
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, norm=BoundaryNorm(bounds, cmap.N))
    ax.set_xticks(range(len(allocs)), [str(a.get("step")) for a in allocs], rotation=90, fontsize=7)
    ax.set_xlabel("QAT step of the allocation")
    if len(layers) <= MAX_LABELLED_LAYERS:
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
    else:
        ax.set_ylabel(f"{len(layers)} layers, in module order")
        ax.set_yticks([])
    fig.colorbar(im, ax=ax, ticks=widths, label="weight bits")
    return fig


def _colour(k: int, n: int) -> tuple[float, float, float, float]:
    from matplotlib import colormaps

    return colormaps["viridis"](k / max(n - 1, 1))


def qbitopt_section(rows: list[Row], settings: Any) -> Section:
    allocs = allocations(rows)
    if not allocs:
        return Section("Bit reallocation (QBitOpt)", '<p class="note">No QAT evaluation logged an allocation yet.</p>')
    last = allocs[-1]
    changed = sum(1 for a in allocs[1:] if (num(a.get("changed")) or 0) > 0)
    kind, limit, used = last.get("budget"), num(last.get("limit")), num(last.get("used"))
    met = all(a.get("met") is True for a in allocs)
    note = (f"<p>{len(allocs)} allocations ({len(allocs) - 1} after the start, {changed} of them changed a width); "
            f"budget {kind} ≤ {limit:g}, used {used:.6g} at the last; budget met in "
            f"{'every' if met else 'NOT every'} allocation. Solver {settings.solver}, sensitivity "
            f"{settings.sensitivity}, τ = {settings.tau} steps.</p>")  # fmt: skip
    sens = last.get("sensitivity") if isinstance(last.get("sensitivity"), dict) else {}
    body = [[str(n), str(b), f"{v:.3e}" if (v := num(sens.get(n))) is not None else "pinned"]
            for n, b in last["bits"].items()]  # fmt: skip
    table = html_table(["layer", "bits", "sensitivity c_l"], body, (1, 2))
    return Section("Bit reallocation (QBitOpt)", note + table,
                   [("qbitopt_bits", "weight bit width per layer at each allocation", plot_bits(allocs))])
