"""What the run report and the methods' report sections share: Agg figures, HTML tables, plain numbers.

A method contributes its part of a run's report as a ``Section`` (``Method.report(rows)``): a title,
HTML that is already escaped, and figures, each a ``(stem, caption, Figure)`` or a
``(stem, caption, reason)`` string saying why that plot is left out. Figures use ``Figure`` + the Agg
canvas, never pyplot, so matplotlib's global state is untouched.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Row", "Section", "num", "figure", "html_table"]

Row = dict[str, Any]


@dataclass
class Section:
    """One part of the report: ``title``, escaped ``html``, and ``figures`` as (stem, caption, Figure | reason)."""

    title: str
    html: str = ""
    figures: list[tuple[str, str, Figure | str]] = field(default_factory=list)


def num(v: Any) -> float | None:
    """``v`` as a finite float, or None (missing, not a number, NaN)."""
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=150, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def html_table(head: list[str], body: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """An HTML table of plain strings (escaped here); columns in ``numeric`` are right-aligned."""

    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}{' class=n' * (i in numeric)}>{html.escape(c)}</{tag}>" for i, c in enumerate(row))

    return "<table>" + (f"<tr>{cells('th', head)}</tr>" if head else "") + "".join(
        f"<tr>{cells('td', r)}</tr>" for r in body) + "</table>"
