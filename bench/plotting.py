"""Small matplotlib helpers shared by the benchmark scripts (PNG only, no display).

Why a module of its own: every benchmark draws the same two kinds of figure
(lines over steps/tokens/λ, bars per method) and must write them the same
safe way. Figures are built on the Agg canvas directly (no ``pyplot``): no
global backend state, no display needed, safe in worker threads. Writes are
atomic (temporary file in the same folder, then ``os.replace``) so a report
generated while a benchmark runs never reads half a PNG.

API (keep it small; other bench scripts import it):

- ``figure(title, xlabel, ylabel, logx=False, logy=False) -> (fig, ax)`` (tasks.plots.figure, shared with the runs)
- ``save(fig, path) -> path``
- ``line_plot(path, series, title=..., xlabel=..., ylabel=..., logx, logy, hlines) -> path``
- ``bar_plot(path, labels, values, title=..., ylabel=..., logy) -> path``
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from tasks.plots import figure, save_png

Series = tuple[Sequence[float], Sequence[float]]


_MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")
_DASHES = ("-", "--", "-.", ":")

save = save_png  # write ``fig`` as a PNG at ``path`` atomically; returns the path


def _drawable(xs: Sequence[float], ys: Sequence[float], logx: bool, logy: bool) -> tuple[list, list]:
    """Finite points only, and positive ones on a log axis (log(0) cannot be drawn)."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys)
           if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
           and (x > 0 or not logx) and (y > 0 or not logy)]
    return [p[0] for p in pts], [p[1] for p in pts]


def line_plot(path: str | Path, series: Mapping[str, Series], *, title: str, xlabel: str, ylabel: str,
              logx: bool = False, logy: bool = False, hlines: Mapping[str, float] | None = None) -> Path:
    """One line (with markers) per ``label -> (xs, ys)``; ``hlines`` are dashed reference levels.

    Points that cannot be drawn on the chosen scale are dropped; a figure with
    nothing to draw says so instead of failing.
    """
    outside = len(series) + len(hlines or {}) > 6  # a long legend goes beside the axes, not over the data
    fig, ax = figure(title, xlabel, ylabel, logx=logx, logy=logy, size=(10.0, 4.5) if outside else (7.0, 4.0))
    drawn = False
    for i, (label, (xs, ys)) in enumerate(series.items()):
        px, py = _drawable(xs, ys, logx, logy)
        if px:  # each line its own marker and dash: two rungs that tie stay visible on top of each other
            ax.plot(px, py, marker=_MARKERS[i % len(_MARKERS)], markersize=5 if i % 2 else 3.5,
                    linestyle=_DASHES[i % len(_DASHES)], label=label)
            drawn = True
    for i, (label, level) in enumerate((hlines or {}).items()):
        if level is not None and math.isfinite(level) and (level > 0 or not logy):
            ax.axhline(level, linestyle="--", color=f"C{(len(series) + i) % 10}", label=label)
            drawn = True
    if drawn:
        ax.legend(**({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if outside else {"loc": "best"}), fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data to draw", ha="center", va="center", transform=ax.transAxes)
    return save(fig, path)


def bar_plot(path: str | Path, labels: Sequence[str], values: Sequence[float | None], *, title: str,
             ylabel: str, logy: bool = False, fmt: str = "{:.2f}") -> Path:
    """One labelled bar per entry (the value printed on it); ``None`` values are left empty."""
    fig, ax = figure(title, "", ylabel, logy=logy)
    shown = [v if v is not None and math.isfinite(v) and (v > 0 or not logy) else math.nan for v in values]
    bars = ax.bar(list(labels), shown, color=[f"C{i % 10}" for i in range(len(labels))])
    for bar, v in zip(bars, shown):
        if math.isfinite(v):
            ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                        fontsize=8)
    finite = [v for v in shown if math.isfinite(v)]
    if logy and finite:  # log bars start at the axis bottom: put it well below the smallest bar
        ax.set_ylim(bottom=min(finite) / 2, top=max(finite) * 1.5)
    ax.tick_params(axis="x", rotation=30)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    return save(fig, path)
