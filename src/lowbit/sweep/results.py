"""A sweep's results: ECR per cell, the CSV, the markdown tables and the plots.

Rows are grouped three ways:

- replicates: cells that differ only in ``seed`` / ``data.split_seed`` (``REPLICATE_KEYS``) are
  repetitions of one configuration; tables and plots show their mean and standard deviation;
- panels: cells that differ in any other swept key except ``model.*`` and ``quant.weight.bits``
  (a dataset, a QAT setting) get their own plots and their own float curve for ECR;
- series: within a panel, one line per weight bit width and per value of the swept ``model.*`` keys
  other than the x axis (``x_key``: the first swept ``model.*`` key unless given); the x axis is the
  parameter count.

ECR (``lowbit.methods.resiliency.effective_compression_ratio``) is computed per panel and replicate
for each cell, and per panel on the mean errors for the merged rows (``aggregate``):
the float networks of that panel and seed, of every size, form the error-versus-size curve (error =
100 - accuracy, size = float32 parameters and buffers in bits); a quantized network's size is its packed
payload in bits (weights at their bit width, scales, and what stays float).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

from lowbit.errors import ConfigError

__all__ = [
    "REPLICATE_KEYS",
    "PRECISION_KEY",
    "COLUMNS",
    "add_ecr",
    "aggregate",
    "fmt_value",
    "markdown_cells",
    "markdown_mean",
    "plot_sweep",
    "short_names",
    "write_results",
]

Row = dict[str, Any]
REPLICATE_KEYS = ("seed", "data.split_seed")
PRECISION_KEY = "quant.weight.bits"
COLUMNS = (
    "cell",
    "dataset",
    "model",
    "num_parameters",
    "weight_bits",
    "act_bits",
    "metric_name",
    "float_metric",
    "direct_metric",
    "quant_metric",
    "float_size_bits",
    "quant_size_bits",
    "ecr",
    "ecr_direct",
    "train_seconds",
)
METRICS = ("float_metric", "direct_metric", "quant_metric", "gap", "direct_gap")


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its last part, or in full (dots as dashes) where two keys share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "-")) for k, s in zip(keys, last, strict=True)}


def fmt_value(value: Any) -> str:
    """A swept value as text for names and tables (lists joined by dashes)."""
    if isinstance(value, list | tuple):
        return "-".join(fmt_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{fmt_value(v)}" for k, v in sorted(value.items()))
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _panel_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if not k.startswith("model.") and k != PRECISION_KEY and k not in REPLICATE_KEYS]


def _group(rows: list[Row], by: list[str]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(", ".join(f"{k}={fmt_value(r[k])}" for k in by), []).append(r)
    return out


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _error(row: Row, key: str) -> float:
    return math.nan if row.get("metric_name") != "accuracy" else 100.0 - _num(row.get(key))


def _fill_ecr(group: list[Row], float_error: str, targets: dict[str, str]) -> None:
    """ECR for every row of ``group`` against the float curve of the group itself (None off the curve).

    ``float_error`` / the keys of ``targets`` name the accuracy fields read as errors (100 - accuracy);
    the values of ``targets`` name the fields written.
    """
    import numpy as np

    from lowbit.sweep.ecr import effective_compression_ratio

    for r in group:
        r.update(dict.fromkeys(targets.values()))
    group = [r for r in group if r["float_size_bits"] and r["quant_size_bits"]]  # sizes unknown: no ECR
    points = sorted({(r["float_size_bits"], _error(r, float_error)) for r in group})
    points = [p for p in points if math.isfinite(p[1])]
    if not points:
        return
    fs, fe = zip(*points, strict=True)
    for key, target in targets.items():
        ecr = effective_compression_ratio(
            fs, fe, [r["quant_size_bits"] for r in group], [_error(r, key) for r in group]
        )
        for r, v in zip(group, ecr, strict=True):
            r[target] = None if np.isnan(v) else round(float(v), 3)


def add_ecr(rows: list[Row], keys: list[str]) -> None:
    """Fill ``ecr`` (retrained) and ``ecr_direct`` in place, per panel and replicate (None off the curve)."""
    by = _panel_keys(keys) + [k for k in keys if k in REPLICATE_KEYS]
    for group in _group(rows, by).values():
        _fill_ecr(group, "float_metric", {"quant_metric": "ecr", "direct_metric": "ecr_direct"})


def aggregate(rows: list[Row], keys: list[str]) -> list[Row]:
    """One row per configuration (replicates merged): ``<metric>_mean`` / ``_sd`` / ``_n`` for each of
    float, direct, retrained and the gaps (float - retrained, float - direct); ``ecr_of_means`` and
    ``ecr_direct_of_means``: ECR of the mean errors on the panel's float curve of mean errors (steadier
    than the mean of per-seed ECRs where the float curve is flat)."""
    rest = [k for k in keys if k not in REPLICATE_KEYS]
    out = []
    for group in _group(rows, rest).values():
        first = group[0]
        agg: Row = {k: first[k] for k in rest}
        for k in (
            "dataset",
            "model",
            "metric_name",
            "num_parameters",
            "weight_bits",
            "quant_size_bits",
            "float_size_bits",
        ):
            agg[k] = first[k]
        agg["replicates"] = len(group)
        for m in METRICS:
            if m == "gap":
                vals = [_num(r["float_metric"]) - _num(r["quant_metric"]) for r in group]
            elif m == "direct_gap":
                vals = [_num(r["float_metric"]) - _num(r["direct_metric"]) for r in group]
            else:
                vals = [_num(r.get(m)) for r in group]
            vals = [v for v in vals if math.isfinite(v)]
            agg[f"{m}_mean"] = statistics.fmean(vals) if vals else math.nan
            agg[f"{m}_sd"] = statistics.stdev(vals) if len(vals) > 1 else math.nan
            agg[f"{m}_n"] = len(vals)
        out.append(agg)
    for panel in _group(out, _panel_keys(keys)).values():
        targets = {"quant_metric_mean": "ecr_of_means", "direct_metric_mean": "ecr_direct_of_means"}
        _fill_ecr(panel, "float_metric_mean", targets)
    return out


def _cell(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return fmt_value(v)


def _table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in body)])


def _unit(rows: list[Row]) -> str:
    """Column suffix: `` %`` for accuracy, else the metric's name (``perplexity`` for LLM runs)."""
    names = sorted({str(r.get("metric_name")) for r in rows})
    return " %" if names == ["accuracy"] else f" ({'/'.join(names)})"


def markdown_cells(rows: list[Row], keys: list[str]) -> str:
    """One table row per cell."""
    short = short_names(keys)
    head = [
        *(short[k] for k in keys),
        "params",
        "W bits",
        f"float{_unit(rows)}",
        f"direct{_unit(rows)}",
        f"retrained{_unit(rows)}",
        "float − retrained",
        "quant. kbit",
        "ECR",
        "ECR direct",
    ]
    body = [
        [
            *(_cell(r[k]) for k in keys),
            _cell(r["num_parameters"]),
            _cell(r["weight_bits"]),
            _cell(r["float_metric"]),
            _cell(r["direct_metric"]),
            _cell(r["quant_metric"]),
            _cell(_num(r["float_metric"]) - _num(r["quant_metric"])),
            _cell(_num(r["quant_size_bits"]) / 1000, 1),
            _cell(r["ecr"]),
            _cell(r["ecr_direct"]),
        ]
        for r in rows
    ]
    return _table(head, body)


def _pm(r: Row, m: str, digits: int = 2) -> str:
    mean, sd = r[f"{m}_mean"], r[f"{m}_sd"]
    if math.isnan(mean):
        return "–"
    tail = "" if math.isnan(sd) else f" ± {sd:.{digits}f}"
    missing = r["replicates"] - r[f"{m}_n"]
    return f"{mean:.{digits}f}{tail}" + (f" ({r[f'{m}_n']}/{r['replicates']})" if missing else "")


def markdown_mean(agg: list[Row], keys: list[str]) -> str:
    """One table row per configuration: mean ± standard deviation over the replicates."""
    rows = agg
    rest = [k for k in keys if k not in REPLICATE_KEYS]
    short = short_names(rest)
    head = [
        *(short[k] for k in rest),
        "params",
        "W bits",
        "n",
        f"float{_unit(rows)}",
        f"direct{_unit(rows)}",
        f"retrained{_unit(rows)}",
        "float − retrained",
        "float − direct",
        "quant. kbit",
        "ECR of means",
    ]
    body = [
        [
            *(_cell(r[k]) for k in rest),
            _cell(r["num_parameters"]),
            _cell(r["weight_bits"]),
            str(r["replicates"]),
            _pm(r, "float_metric"),
            _pm(r, "direct_metric"),
            _pm(r, "quant_metric"),
            _pm(r, "gap"),
            _pm(r, "direct_gap"),
            _cell(_num(r["quant_size_bits"]) / 1000, 1),
            _cell(r["ecr_of_means"]),
        ]
        for r in agg
    ]
    return _table(head, body)


def write_results(
    rows: list[Row], out_dir: Path, keys: list[str], x_key: str | None = None, command: str = ""
) -> list[Path]:
    """ECR, then ``results.csv`` (one row per cell), ``results.md`` and the plots; returns the paths."""
    from lowbit.checkpoint import atomic_write_text

    add_ecr(rows, keys)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, tmp = out_dir / "results.csv", out_dir / ".results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*keys, *COLUMNS])
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, list | dict) else v) for k, v in r.items()})
    tmp.replace(csv_path)
    what = ", ".join(sorted({f"{r['model']} on {r['dataset']}" for r in rows})) or "no finished cells"
    md = [
        f"# Sweep {out_dir.name}",
        "",
        f"`{command}`" if command else "",
        "",
        f"{len(rows)} finished cells · {what} · {_unit(rows).strip(' ()%') or 'accuracy in %'} on the test split; "
        "direct = quantized before QAT; "
        "retrained = the integer model after QAT; quant. kbit = the packed payload; ECR = size of the float "
        "network that reaches the same error (interpolated on this sweep's float curve) / quantized size; "
        "– = outside the float curve",
        "",
    ]
    if any(k in REPLICATE_KEYS for k in keys):
        md += [
            "## Mean ± standard deviation over replicates",
            "",
            markdown_mean(aggregate(rows, keys), keys),
            "",
            "## Every cell",
            "",
        ]
    md += [markdown_cells(rows, keys), ""]
    atomic_write_text(out_dir / "results.md", "\n".join(md))
    return [csv_path, out_dir / "results.md", *plot_sweep(rows, keys, out_dir, x_key)]


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def plot_sweep(rows: list[Row], keys: list[str], out_dir: Path, x_key: str | None = None) -> list[Path]:
    """Per panel: ``accuracy``, ``gap`` and ``ecr`` PNGs against the parameter count (means over replicates,
    bars: standard deviation; solid lines retrained, dashed direct, black float), and ``memory``: the
    retrained accuracy against the network's size in bits, which answers "more weights at fewer bits, or
    fewer at more?" for a memory budget."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    model_keys = [k for k in keys if k.startswith("model.")]
    if x_key is not None and x_key not in model_keys:
        raise ConfigError(f"x={x_key!r} is not allowed: use a swept model key ({', '.join(model_keys) or 'none'})")
    x_key = x_key or (model_keys[0] if model_keys else None)
    others = [k for k in model_keys if k != x_key]
    agg = [r for r in aggregate(rows, keys) if r["num_parameters"] and r["weight_bits"]]
    agg = [r for r in agg if r["metric_name"] == "accuracy"]
    if not agg:  # e.g. LLM runs (perplexity, no error curve to read an ECR from): the tables say it all
        return []
    panels = _group(agg, _panel_keys(keys))
    paths: list[Path] = []
    for label, panel in panels.items():
        drawn: set[int] = set()  # axes holding at least one finite point (only those get a log x axis)
        figs = {}
        for kind, ncols in (("accuracy", 1), ("gap", 2), ("ecr", 1), ("memory", 1)):
            fig = Figure(figsize=(5.5 * ncols, 4), dpi=130, layout="constrained")
            FigureCanvasAgg(fig)
            figs[kind] = (fig, list(fig.subplots(1, ncols, squeeze=False)[0]))
        bits_all = sorted({r["weight_bits"] for r in panel})
        colors = {b: f"C{i}" for i, b in enumerate(bits_all)}
        for gi, (gk, group) in enumerate(_group(panel, others).items()):
            tag, marker = (f" {gk}" if gk else ""), "osD^v<>ph"[gi % 9]

            def line(
                ax: Any,
                pts: list[Row],
                m: str,
                marker: str = marker,
                x: str = "num_parameters",
                drawn: set[int] = drawn,
                **kw: Any,
            ) -> None:
                pts = [r for r in pts if math.isfinite(_num(r.get(f"{m}_mean", r.get(m)))) and _num(r[x]) > 0]
                if not pts:  # e.g. no ECR without float networks of two sizes
                    return
                drawn.add(id(ax))
                ys = [_num(r.get(f"{m}_mean", r.get(m))) for r in pts]
                es = [r.get(f"{m}_sd", math.nan) for r in pts]
                ax.errorbar(
                    [r[x] / (1000 if x.endswith("_bits") else 1) for r in pts],
                    ys,
                    yerr=None if all(map(math.isnan, es)) else es,
                    marker=marker,
                    ms=4,
                    capsize=2,
                    **kw,
                )

            floats = sorted({r["num_parameters"]: r for r in group}.values(), key=lambda r: r["num_parameters"])
            # the float network is shared across bit widths; drawn on top, where W8 often hides it
            line(figs["accuracy"][1][0], floats, "float_metric", color="k", zorder=5, label=f"float{tag}")
            line(figs["memory"][1][0], floats, "float_metric", x="float_size_bits", color="k", label=f"float{tag}")
            for b in bits_all:
                pts = sorted((r for r in group if r["weight_bits"] == b), key=lambda r: r["num_parameters"])
                if not pts:
                    continue
                c = colors[b]
                line(figs["accuracy"][1][0], pts, "quant_metric", color=c, label=f"W{b} retrained{tag}")
                line(figs["accuracy"][1][0], pts, "direct_metric", color=c, ls="--", label=f"W{b} direct{tag}")
                line(figs["memory"][1][0], pts, "quant_metric", x="quant_size_bits", color=c, label=f"W{b}{tag}")
                line(figs["gap"][1][0], pts, "gap", color=c, label=f"W{b}{tag}")
                line(figs["gap"][1][1], pts, "direct_gap", color=c, ls="--", label=f"W{b}{tag}")
                line(figs["ecr"][1][0], pts, "ecr_of_means", color=c, label=f"W{b} retrained{tag}")
                line(figs["ecr"][1][0], pts, "ecr_direct_of_means", color=c, ls="--", label=f"W{b} direct{tag}")
                if gi == 0:
                    figs["ecr"][1][0].axhline(32 / b, color=c, lw=0.8, ls=":", label=f"32/{b} (no loss, no overhead)")
        title = out_dir.name + (f" · {label}" if label else "")
        labels = {
            "accuracy": ["test accuracy (%)"],
            "ecr": ["effective compression ratio"],
            "memory": ["test accuracy (%), retrained"],
            "gap": ["float − retrained (points)", "float − direct (points)"],
        }
        for kind, (_, axes) in figs.items():
            for ax, ylabel in zip(axes, labels[kind], strict=True):
                xlabel = (
                    "memory (kbit: packed payload; float: 32-bit)"
                    if kind == "memory"
                    else f"parameters (swept: {x_key or 'none'})"
                )
                ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
                if id(ax) in drawn:
                    ax.set_xscale("log")
                    ax.xaxis.set_minor_formatter(NullFormatter())
                else:
                    why = "ECR needs float networks of two or more sizes" if kind == "ecr" else "no finished values"
                    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.4")
                if kind == "gap":
                    ax.axhline(0, color="k", lw=0.6)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        suffix = "" if len(panels) == 1 else "__" + re.sub(r"[^A-Za-z0-9.+-]+", "-", label)
        paths += [_save(fig, out_dir / f"{kind}{suffix}.png") for kind, (fig, _) in figs.items()]
    return paths
