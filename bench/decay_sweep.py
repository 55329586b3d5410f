"""Decay sweep: λ_max × T0 for AST-Naive at the bench step budget (issue #6, item 1b).

Why: the paper tuned λ_max (1e-4 for GPT-2, 6e-5 for 7B) for 10k–40k steps.
At a few hundred steps those values barely move the masked weights, and
without enough decay the refreshed mask keeps oscillating (STE + refresh at
λ = 0 was measured unstable). This sweep measures, on the same data, teacher
cache and batches, what λ_max and ramp length T0 (λ reaches λ_max at step T0)
work at *this* budget, so the presets' defaults rest on a measurement.

Method AST-Naive (KD, mask refresh as in the preset, no SLoRB: the decay is
isolated); zero-shot off; ``evaluate.max_windows=8``; validation every
``steps // 4`` steps. Variants: the λ = 0 reference once, then every
λ_max × T0 pair (T0 = round(frac × steps)). A re-run skips finished stages.

    python -m bench.decay_sweep [--params params/smollm2-quick.yaml] [--steps 40]
                                [--lambdas 1e-4 5e-4 2e-3 1e-2] [--t0-fracs 0.25 0.5]
                                [--set k=v ...] [--out-dir bench/results] [--work artifacts/bench/sweep]

Writes ``sweep.json``, ``sweep.md``, ``sweep.png`` (ppl vs λ_max per T0),
``sweep_flips.png`` (flip rate per refresh) and ``sweep_ratio.png`` (pruned/kept
|W| ratio) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

from tasks.tables import markdown_table  # noqa: E402
from ast_core.atomic import atomic_write_text  # noqa: E402
from bench import plotting  # noqa: E402
from bench.ladder import (bench_parser, budget_of, command_line, curve, fail, resolve_params, run_bench,  # noqa: E402
                          train_seconds)
from bench.runner import Variant, write_json  # noqa: E402
from tasks.common import StageError  # noqa: E402
from tasks.config import ConfigError, PipelineConfig  # noqa: E402
from bench.report import Body, fmt  # noqa: E402

DEFAULT_LAMBDAS = (1e-4, 5e-4, 2e-3, 1e-2)
DEFAULT_T0_FRACS = (0.25, 0.5)
REFERENCE = "lambda0"
SWEEP_SETTINGS = ["train.method=ast-naive", "evaluate.max_windows=8", "evaluate.zero_shot.enabled=false"]
PAPER = "the paper's λ_max = 1e-4 (GPT-2; 6e-5 for LLaMA2-7B) was tuned for 10k–40k steps"


# ----------------------------------------------------------------------------- plan

def plan(steps: int, lambdas: list[float], t0_fracs: list[float]) -> list[tuple[Variant, dict[str, Any]]]:
    """The λ = 0 reference, then every λ_max × T0 pair (duplicates after rounding T0 run once)."""
    out = [(Variant(REFERENCE, ["train.lambda_max=0"]), {"lambda_max": 0.0, "t0": None, "t0_frac": None})]
    seen: set[tuple[float, int]] = set()
    for frac in t0_fracs:
        t0 = round(frac * steps)
        for lam in lambdas:
            if lam == 0 or (lam, t0) in seen:
                continue  # λ = 0 is the reference, whatever T0
            seen.add((lam, t0))
            out.append((Variant(f"lam{lam:g}_t0-{t0}", [f"train.lambda_max={lam!r}", f"train.t0_steps={t0}"]),
                        {"lambda_max": float(lam), "t0": t0, "t0_frac": float(frac)}))
    return out


# ----------------------------------------------------------------------------- results -> rows

def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None


def sweep_row(name: str, meta: dict[str, Any], metrics: dict, history: list[dict], steps: int) -> dict[str, Any]:
    """One variant's row: its settings, WikiText-2 ppl, and the series that show how the mask settled."""
    return {
        "name": name, **meta,
        "ppl": float(metrics["ppl_wikitext2"]),
        "flip_rate_final": _finite(metrics.get("flip_rate_final")),
        "flips": [[int(h["step"]), float(h["flip_rate_prev"])] for h in history if "flip_rate_prev" in h],
        "ratio": [[int(h["step"]), _finite(h["pruned_kept_ratio"])] for h in history if "pruned_kept_ratio" in h],
        "curve": curve(history),
        "train_s": train_seconds(history, steps),
    }


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: r["ppl"])


def scaling(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """What was measured about λ_max vs the budget: the best λ_max > 0 and its product with the steps."""
    decayed = [r for r in rows if r["lambda_max"] > 0]
    if not decayed:
        return {"steps": steps, "best_lambda_max": None, "lambda_steps": None}
    b = best_row(decayed)
    return {"steps": steps, "best_lambda_max": b["lambda_max"], "best_t0": b["t0"],
            "lambda_steps": b["lambda_max"] * steps, "paper_lambda_steps": [1e-4 * 10_000, 1e-4 * 40_000]}


def build_report(rows: list[dict[str, Any]], *, cfg: PipelineConfig, params: str, command: str,
                 stamp_: dict, wall_s: float | None = None) -> dict[str, Any]:
    """Everything ``sweep.json`` holds (pure: tests build it from synthetic rows)."""
    budget = budget_of(cfg)
    return {
        "stamp": stamp_, "params": params, "model": cfg.model.student, "command": command,
        "method": cfg.train.method, "budget": budget, "refresh_every": cfg.train.refresh_every,
        "refresh_score": cfg.train.refresh_score,
        "teacher_cache": {"enabled": cfg.teacher_cache.enabled, "format": cfg.teacher_cache.format,
                          "k": cfg.teacher_cache.k, "samples": cfg.teacher_cache.samples},
        "evaluation": {"seq_len": cfg.evaluate.seq_len, "max_windows": cfg.evaluate.max_windows,
                       "zero_shot": cfg.evaluate.zero_shot.enabled, "val_blocks": cfg.data.val_blocks,
                       "val_seq_len": cfg.data.seq_len, "val_every": cfg.train.eval_every},
        "rows": rows,
        "best": {k: best_row(rows)[k] for k in ("name", "lambda_max", "t0", "t0_frac", "ppl")} if rows else None,
        "scaling": scaling(rows, budget["steps"]),
        "wall_s": wall_s,
    }


# ----------------------------------------------------------------------------- rendering

def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _first_last(series: list[list[float]], spec: str) -> str:
    vals = [v for _, v in series if v is not None]
    return f"{vals[0]:{spec}} → {vals[-1]:{spec}}" if vals else "—"


def _t0_txt(r: dict[str, Any]) -> str:
    return "—" if r["t0"] is None else f"{r['t0']} ({r['t0_frac']:.0%})"


def sweep_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, best perplexity first."""
    ref = next((r["ppl"] for r in rows if r["lambda_max"] == 0), None)
    head = ["λ_max", "T0 steps", "WikiText-2 ppl", "vs λ=0", "final flip rate", "flip rate first → last",
            "pruned/kept \\|W\\| first → last", "val ppl start → end"]
    body = []
    for r in sorted(rows, key=lambda r: r["ppl"]):
        vs = None if ref is None else r["ppl"] / ref - 1
        body.append([f"{r['lambda_max']:g}", _t0_txt(r), f"{r['ppl']:.2f}", _fmt(vs, "+.1%"),
                     _fmt(r["flip_rate_final"], ".3%"), _first_last(r["flips"], ".3%"),
                     _first_last(r["ratio"], ".3f"), _first_last(r["curve"], ".1f")])
    return markdown_table(head, body)


def best_line(report: dict[str, Any]) -> str:
    b = report["best"]
    if b is None:
        return "Best: no rows."
    if b["lambda_max"] == 0:
        return f"Best: λ = 0 (STE + refresh, no decay), ppl {b['ppl']:.2f}: no decay setting beat it at this budget."
    ref = next((r["ppl"] for r in report["rows"] if r["lambda_max"] == 0), None)
    vs = f" vs {ref:.2f} at λ = 0" if ref is not None else ""
    return (f"Best: λ_max = {b['lambda_max']:g}, T0 = {b['t0']} steps ({b['t0_frac']:.0%} of "
            f"{report['budget']['steps']}), ppl {b['ppl']:.2f}{vs}.")


def scaling_line(report: dict[str, Any]) -> str:
    s = report["scaling"]
    if s["best_lambda_max"] is None:
        return f"Scaling: no λ_max > 0 was run; {PAPER}."
    return (f"Scaling to another step budget: measured here, the best λ_max × steps = {s['best_lambda_max']:g} × "
            f"{s['steps']} = {s['lambda_steps']:.3g} (at this one budget only); {PAPER}, i.e. λ_max × steps = "
            f"{s['paper_lambda_steps'][0]:g}–{s['paper_lambda_steps'][1]:g}. Whether a constant λ_max × steps "
            f"carries over was not measured: for another budget, re-run this sweep with `--steps N`.")


def render_markdown(r: dict[str, Any]) -> str:
    s, b, e = r["stamp"], r["budget"], r["evaluation"]
    return "\n".join([
        f"## Decay sweep: {r['model']}, {r['method']}, λ_max × T0",
        "",
        f"Measured {s.get('date')} on {s.get('machine')} (commit {s.get('commit')}, torch {s.get('torch')}, "
        f"{s.get('threads')} threads); params `{r['params']}`.",
        "",
        f"Budget: {b['steps']} steps × {b['batch']}×{b['seq_len']} tokens = {b['tokens']:,} tokens per run, "
        f"same blocks and order; {r['method']} (KD, no SLoRB), mask refresh every {r['refresh_every']} steps "
        f"by {r.get('refresh_score', 'magnitude')} score; "
        "λ(t) ramps to λ_max over T0 steps. λ = 0 is STE + refresh without decay.",
        "",
        f"Evaluation: WikiText-2 test perplexity over {e['max_windows']} windows × {e['seq_len']} tokens; "
        f"zero-shot {'on' if e['zero_shot'] else 'off'}; validation on {e['val_blocks']}×{e['val_seq_len']} "
        f"held-out tokens every {e['val_every']} steps. Flip rate: share of mask bits changed at a refresh "
        "(vs the previous mask); pruned/kept: mean |W| of masked-out / kept weights.",
        "",
        sweep_table(r["rows"]),
        best_line(r),
        "",
        scaling_line(r),
        "",
        "Plots: `sweep.png` (ppl vs λ_max), `sweep_flips.png` (flip rate per refresh), "
        "`sweep_ratio.png` (pruned/kept |W| ratio).",
        "",
        f"Command: `{r['command']}`",
        "",
    ])


def _curve_frac(rows: list[dict[str, Any]]) -> float | None:
    """The T0 fraction the per-step plots show: 25% when swept, else the nearest one."""
    fracs = sorted({r["t0_frac"] for r in rows if r["t0_frac"] is not None})
    return min(fracs, key=lambda f: abs(f - 0.25)) if fracs else None


def _xy(series: list[list[float]]) -> tuple[list[float], list[float]]:
    pts = [p for p in series if p[1] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``sweep.json``, ``sweep.md`` and the three PNGs (each written atomically)."""
    out_dir = Path(out_dir)
    rows = report["rows"]
    write_json(out_dir / "sweep.json", report)
    atomic_write_text(out_dir / "sweep.md", render_markdown(report))
    ref = next((r for r in rows if r["lambda_max"] == 0), None)
    steps = report["budget"]["steps"]

    per_t0: dict[str, tuple[list[float], list[float]]] = {}
    for frac in sorted({r["t0_frac"] for r in rows if r["t0_frac"] is not None}):
        pts = sorted((r["lambda_max"], r["ppl"]) for r in rows if r["t0_frac"] == frac)
        per_t0[f"T0 = {frac:.0%} ({round(frac * steps)} steps)"] = ([p[0] for p in pts], [p[1] for p in pts])
    written = [out_dir / "sweep.json", out_dir / "sweep.md"]
    written.append(plotting.line_plot(
        out_dir / "sweep.png", per_t0, title=f"WikiText-2 perplexity vs λ_max ({steps} steps)",
        xlabel="λ_max (log scale)", ylabel="perplexity", logx=True,
        hlines={"λ = 0 (STE + refresh)": ref["ppl"]} if ref else None))

    frac = _curve_frac(rows)
    shown = ([ref] if ref else []) + sorted((r for r in rows if frac is not None and r["t0_frac"] == frac),
                                            key=lambda r: r["lambda_max"])
    at = f"T0 = {frac:.0%}" if frac is not None else "λ = 0"
    written.append(plotting.line_plot(
        out_dir / "sweep_flips.png", {f"λ_max = {r['lambda_max']:g}": _xy(r["flips"]) for r in shown},
        title=f"mask flip rate since the previous refresh ({at}; zeros not drawn)", xlabel="step",
        ylabel="fraction of mask bits changed (log scale)", logy=True))
    written.append(plotting.line_plot(
        out_dir / "sweep_ratio.png", {f"λ_max = {r['lambda_max']:g}": _xy(r["ratio"]) for r in shown},
        title=f"mean |W| pruned / mean |W| kept at each refresh ({at})", xlabel="step",
        ylabel="pruned/kept |W| ratio"))
    return written


# ----------------------------------------------------------------------------- running

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser("decay_sweep.py", __doc__, steps=40, work="sweep")
    ap.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS), metavar="LAMBDA",
                    help="λ_max values (> 0; the λ = 0 reference always runs)")
    ap.add_argument("--t0-fracs", type=float, nargs="+", default=list(DEFAULT_T0_FRACS), metavar="FRAC",
                    help="T0 as fractions of --steps")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- report section

def render_body(d: dict, image: Callable[[str, str], str]) -> Body:
    """Decay sweep: the λ = 0 reference and every λ_max × T0 pair (rows of bench/decay_sweep.py), best first."""
    rows, b = d["rows"], d["budget"]
    ref = next((r["ppl"] for r in rows if r["lambda_max"] == 0), None)
    lines = [f"Model `{d.get('model', '?')}`, {d.get('method', 'ast-naive')} (KD, no SLoRB), params "
             f"`{d.get('params', '?')}`. Budget per run: {b['steps']} steps × {b['batch']}×{b['seq_len']} tokens = "
             f"{b['tokens']:,} tokens (same blocks, same order); mask refresh every {d.get('refresh_every', '?')} "
             f"steps by {d.get('refresh_score', 'magnitude')} score; λ(t) ramps to λ_max over T0 steps; "
             "λ = 0 is STE + refresh without decay.", ""]
    body = []
    for r in sorted(rows, key=lambda r: r["ppl"]):
        t0 = "—" if r.get("t0") is None else f"{r['t0']}" + (f" ({r['t0_frac']:.0%})" if r.get("t0_frac") else "")
        vs = None if ref is None else r["ppl"] / ref - 1
        body.append([f"{r['lambda_max']:g}", t0, fmt(r["ppl"]), fmt(vs, "+.1%"), fmt(r.get("flip_rate_final"), ".3%"),
                     _first_last(r.get("flips", []), ".3%"), _first_last(r.get("ratio", []), ".3f"),
                     _first_last(r.get("curve", []), ".1f")])
    lines.append(markdown_table(["λ_max", "T0 steps", "WikiText-2 ppl", "vs λ = 0", "final flip rate",
                                 "flip rate first → last", "pruned/kept \\|W\\| first → last", "val ppl start → end"],
                                body, "llrrrrrr"))
    best = d.get("best")
    if isinstance(best, dict) and best.get("lambda_max") is not None:
        if best["lambda_max"] == 0:
            lines.append(f"Best: λ = 0 (no decay), ppl {best['ppl']:.2f}: no decay setting beat it at this budget.")
        else:
            lines.append(f"Best: λ_max = {best['lambda_max']:g}, T0 = {best.get('t0')} steps, ppl {best['ppl']:.2f}"
                         + (f" (λ = 0: {ref:.2f})." if ref is not None else "."))
        lines.append("")
    sc = d.get("scaling") or {}
    if sc.get("lambda_steps") is not None:
        lines += [f"λ_max × steps of the best setting: {sc['best_lambda_max']:g} × {sc['steps']} = "
                  f"{sc['lambda_steps']:.3g} (measured at this budget only; the paper's 1e-4 over 10k–40k steps "
                  "is 1–4).", ""]
    for name, alt in (("sweep.png", "perplexity vs λ_max per T0"), ("sweep_flips.png", "flip rate per refresh"),
                      ("sweep_ratio.png", "pruned/kept weight-magnitude ratio per refresh")):
        lines.append(image(name, alt))
    return Body("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = plan(args.steps, args.lambdas, args.t0_fracs)
    try:
        run = run_bench("decay sweep", resolve_params(args.params), args.steps, SWEEP_SETTINGS, args.overrides,
                        [v for v, _ in runs], args.work, f"{len(runs)} runs ({len(runs) - 1} λ_max × T0 + λ = 0)")
    except (ConfigError, StageError) as err:
        return fail(err)
    rows = [sweep_row(v.name, meta, run.results[v.name].metrics, run.results[v.name].history, run.budget["steps"])
            for v, meta in runs]
    report = build_report(rows, cfg=run.cfg, params=args.params, command=command_line("decay_sweep.py", argv),
                          stamp_=run.stamp, wall_s=run.wall_s)
    written = write_outputs(report, args.out_dir)
    print(sweep_table(rows), end="")
    print(best_line(report))
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
