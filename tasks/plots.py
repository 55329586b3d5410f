"""PNG plots of a run: training curves from ``train/history.jsonl`` and the perplexity bars.

They land in ``DIR/plots/`` (so ``dvc plots`` can show them) and are logged to
MLflow by :mod:`tasks.tracking`. Figures are drawn with matplotlib's Agg
canvas directly (no ``pyplot``): no global backend state, no display needed,
and safe from the worker threads Prefect may run stages in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ast_core.atomic import atomic_path

TRAIN_PLOTS = ("train_loss.png", "train_flip_rate.png", "train_schedule.png")
EVAL_PLOTS = ("ppl.png",)
VAL_PLOT = "train_val_ppl.png"  # written only when training ran validation (train.eval_every)


def read_history(path: Path) -> list[dict[str, float]]:
    """Per-step records of ``history.jsonl``; an absent file means no training (baselines)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figure(title: str, xlabel: str = "", ylabel: str = "", *, logx: bool = False, logy: bool = False,
           size: tuple[float, float] = (7.0, 4.0)) -> tuple[Any, Any]:
    """A fresh Agg figure with one grid-lined axes, titled and labelled (the runs' plots and the benchmarks')."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    return fig, ax


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG atomically: a reader (DVC, the MLflow upload, a report) never sees half a PNG.
    Also the benchmarks' ``bench.plotting.save``."""
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def _series(history: list[dict[str, float]], key: str, positive: bool = False) -> tuple[list[float], list[float]]:
    pts = [(h["step"], h[key]) for h in history
           if key in h and math.isfinite(h[key]) and (h[key] > 0 or not positive)]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_plots(history: list[dict[str, float]], out_dir: Path) -> list[Path]:
    """Loss parts, flip rates (log scale) and the λ/lr schedules vs step; [] without history."""
    if not history:
        return []
    written = []
    fig, ax = figure("training loss (KD: α·KL + (1-α)·CE)", size=(7, 5.5))
    marker = "." if len(history) < 50 else None
    for key in ("loss", "ce"):
        xs, ys = _series(history, key)
        ax.plot(xs, ys, label=key, marker=marker)
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    xs, ys = _series(history, "kl")
    if xs and any(ys):  # methods without KD log kl = 0
        kl_ax = fig.add_subplot(2, 1, 2, sharex=ax)  # KL is often orders of magnitude below CE
        ax.set_subplotspec(fig.add_gridspec(2, 1)[0])
        kl_ax.plot(xs, ys, label="kl (teacher ‖ student)", color="tab:green", marker=marker)
        kl_ax.set_ylabel("kl")
        kl_ax.grid(True, alpha=0.3)
        kl_ax.legend(loc="best")
        kl_ax.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    written.append(save_png(fig, out_dir / TRAIN_PLOTS[0]))

    fig, ax = figure("mask flip rate per refresh")
    drawn = False
    for key, label in (("flip_rate_prev", "since previous refresh"), ("flip_rate_init", "since initial mask")):
        xs, ys = _series(history, key, positive=True)  # log scale: a 0 flip rate cannot be drawn
        if xs:
            ax.plot(xs, ys, label=label, marker="o")
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no mask flips (fixed mask or no refresh)", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of mask bits changed")
    written.append(save_png(fig, out_dir / TRAIN_PLOTS[1]))

    fig, ax = figure("schedules: SR-STE decay λ(t) and learning rate")
    xs, lam = _series(history, "lam")
    ax.plot(xs, lam, color="tab:red", label="λ(t)")
    ax.set_xlabel("step")
    ax.set_ylabel("λ(t)", color="tab:red")
    ax2 = ax.twinx()  # λ ~1e-3 and lr ~1e-4 would flatten each other on one axis
    xs, lr = _series(history, "lr")
    ax2.plot(xs, lr, color="tab:blue", label="lr")
    ax2.set_ylabel("lr", color="tab:blue")
    written.append(save_png(fig, out_dir / TRAIN_PLOTS[2]))

    xs, ys = _series(history, "val_ppl")
    if xs:  # only with train.eval_every
        fig, ax = figure("validation perplexity vs training step (fixed held-out blocks)")
        ax.plot(xs, ys, marker="o", color="tab:purple")
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        written.append(save_png(fig, out_dir / VAL_PLOT))
    return written


def perplexity_plot(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """WikiText-2 perplexity, dense teacher vs the sparse model, values printed on the bars."""
    if "ppl_wikitext2" not in metrics or "ppl_wikitext2_dense" not in metrics:
        return []
    labels = ["dense", str(metrics.get("method", "sparse"))]
    values = [float(metrics["ppl_wikitext2_dense"]), float(metrics["ppl_wikitext2"])]
    fig, ax = figure("WikiText-2 perplexity (lower is better)")
    bars = ax.bar(labels, values, color=["tab:gray", "tab:green"])
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel("perplexity")
    return [save_png(fig, out_dir / EVAL_PLOTS[0])]
