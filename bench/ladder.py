"""The method ladder: every method on one data set, one teacher cache, one token budget (issue #6, item 1).

Why: the product's claim is that adaptive sparse training recovers more of the
2:4 pruning loss than one-shot pruning and than plain retraining with a fixed
mask, at the same cost. That is only shown by running the rungs side by side:

  dense · one-shot magnitude / Wanda / SparseGPT · naive retraining (fixed mask,
  CE only) · ast-ste (STE + mask refresh, λ = 0: no decay) · AST-Naive · AST-Boosted

All trained methods see the same blocks in the same order (same seed) for
``--steps`` steps; validation perplexity on the fixed held-out blocks every
``steps // 4`` steps gives the perplexity-vs-tokens curve. The runs go through
the pipeline's own stages (:mod:`bench.runner`); compile is skipped (it changes
no weight and costs minutes on CPU). A re-run skips every finished stage, so an
interrupted ladder continues where it stopped.

    python -m bench.ladder [--params params/smollm2-quick.yaml] [--steps 100] [--set k=v ...]
                           [--out-dir bench/results] [--work artifacts/bench/ladder] [--only NAME ...]

Writes ``ladder.json``, ``ladder.md``, ``ladder.png`` (perplexity bars) and
``ladder_curve.png`` (validation perplexity vs tokens) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

from ast_core.atomic import atomic_write_text  # noqa: E402
from bench import plotting  # noqa: E402
from bench.labels import cache_label  # noqa: E402
from bench.runner import RESULTS, STAGES, WORK, Variant, VariantResult, run_all, stamp, write_json  # noqa: E402
from tasks.common import StageError  # noqa: E402
from tasks.tables import gap_closed, markdown_table  # noqa: E402
from tasks.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from bench.report import Body, Verdict, fmt  # noqa: E402

DEFAULT_PARAMS = "params/smollm2-quick.yaml"
VARIANTS: dict[str, list[str]] = {  # name -> overrides, in ladder order
    "dense": ["train.method=dense"],
    "oneshot-magnitude": ["train.method=oneshot-magnitude"],
    "oneshot-wanda": ["train.method=oneshot-wanda"],
    "oneshot-sparsegpt": ["train.method=oneshot-sparsegpt"],
    "naive": ["train.method=naive"],
    "ast-ste": ["train.method=ast-naive", "train.lambda_max=0"],
    "ast-naive": ["train.method=ast-naive"],
    "ast-boosted": ["train.method=ast-boosted"],
}
CURVE_METHODS = ("naive", "ast-ste", "ast-naive", "ast-boosted")
ADAPTIVE = ("ast-ste", "ast-naive", "ast-boosted")  # the ones whose mask is refreshed: a flip rate means something


# ----------------------------------------------------------------------------- shared with decay_sweep

def resolve_params(path: str) -> str:
    """A params path as given, or relative to the repository (the scripts run from anywhere)."""
    p = Path(path)
    return str(p if p.exists() or p.is_absolute() else REPO / p)


def budget_overrides(cfg: PipelineConfig, steps: int) -> list[str]:
    """The token budget as ``--set`` overrides: ``steps`` steps, one epoch of training blocks.

    ``data.max_train_blocks`` = steps × batch (× grad_accum) so each block is seen
    once and the teacher cache covers exactly these. The warm-up is shortened to
    ``steps`` only where the preset's would not fit (a config error otherwise).
    """
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {steps})")
    t = cfg.train
    out = [f"train.steps={steps}", f"data.max_train_blocks={steps * t.batch_size * t.grad_accum}",
           f"train.eval_every={max(1, steps // 4)}", f"train.checkpoint_every={steps}"]
    if t.warmup_steps > steps:
        out.append(f"train.warmup_steps={steps}")
    return out


def budget_config(params: str, steps: int, settings: list[str],
                  overrides: list[str]) -> tuple[list[str], PipelineConfig]:
    """The overrides every variant of a bench shares, and the config they give.

    Order: the step budget (computed from the preset with the user's overrides),
    then the bench's own ``settings``, then the user's ``overrides`` again so
    that they win. Raises :class:`ConfigError` for a bad value.
    """
    base = [*budget_overrides(load_config(params, overrides), steps), *settings, *overrides]
    return base, load_config(params, base)


@dataclass
class BenchRun:
    """What a training benchmark ran: the shared config, its budget, every variant's result."""
    cfg: PipelineConfig
    budget: dict[str, int]
    results: dict[str, VariantResult]
    wall_s: float
    stamp: dict  # taken when the runs started (the commit they ran), with the resolved config


def run_bench(label: str, params: str, steps: int, settings: list[str], overrides: list[str],
              variants: list[Variant], work: Path, what: str) -> BenchRun:
    """The shared budget, one header line, then every variant (the ladder, the sweep, the SLoRB-init bench).

    ``what`` says what the variants are in the header ("3 rung(s)"). Raises
    :class:`ConfigError` / :class:`StageError` before or during the runs.
    """
    base, cfg = budget_config(params, steps, settings, overrides)
    b = budget_of(cfg)
    print(f"{label}: {cfg.model.student}, {what}, {b['steps']} steps × {b['batch']}×{b['seq_len']} "
          f"= {b['tokens']:,} tokens each; work {work}", flush=True)
    started = {**stamp(), "config": cfg.model_dump(mode="json")}
    start = time.perf_counter()
    results = run_all(params, base, variants, Path(work).resolve(), stages=STAGES,
                      log=lambda msg: print(msg, flush=True))
    return BenchRun(cfg, b, results, time.perf_counter() - start, started)


def budget_of(cfg: PipelineConfig) -> dict[str, int]:
    """Steps, blocks per step, block length and tokens per trained method."""
    t = cfg.train
    batch = t.batch_size * t.grad_accum
    return {"steps": t.steps, "batch": batch, "seq_len": cfg.data.seq_len,
            "tokens": t.steps * batch * cfg.data.seq_len}


def curve(history: list[dict]) -> list[list[float]]:
    """``[tokens, val_ppl]`` at every validation point of a training history (step 0 first)."""
    return [[int(h["tokens"]), float(h["val_ppl"])] for h in history if "val_ppl" in h]


def train_seconds(history: list[dict], steps: int) -> float | None:
    """Measured training time: the per-step times of the history (validation excluded).

    Each logged step has ``tokens_per_s`` = its tokens / its time; with
    ``log_every`` > 1 the mean logged step time is scaled to all steps. Read
    from the history, so a re-run that skipped training still reports it.
    """
    recs = [h for h in history if h.get("tokens_per_s") and h.get("step")]
    if not recs:
        return None
    # tokens is cumulative and every step trains the same number, so tokens/step is one step's tokens
    times = [h["tokens"] / h["step"] / h["tokens_per_s"] for h in recs]
    return sum(times) / len(times) * steps


def command_line(script: str, argv: list[str]) -> str:
    """``python -m bench.NAME ARGS`` for ``script`` = ``NAME.py`` (what a results file records)."""
    return "python " + shlex.join(["-m", f"bench.{script.removesuffix('.py')}", *argv])


def fail(err: Exception) -> int:
    """One line on stderr, exit status 2 (the pipeline's convention for bad input)."""
    print(f"error: {err}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- results -> rows

def ladder_rows(runs: dict[str, dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    """One row per run, in the given order. ``runs[name]`` = {"metrics": metrics.json, "history": [...]}.

    The dense reference is the ``dense`` run when present, else the dense
    perplexity every sparse run measured alongside (the same evaluation).
    """
    if "dense" in runs:
        ppl_dense = float(runs["dense"]["metrics"]["ppl_wikitext2"])
    else:
        ppl_dense = next((float(r["metrics"]["ppl_wikitext2_dense"]) for r in runs.values()
                          if "ppl_wikitext2_dense" in r["metrics"]), None)
    sgpt = runs.get("oneshot-sparsegpt")
    ppl_sgpt = float(sgpt["metrics"]["ppl_wikitext2"]) if sgpt else None
    rows = []
    for name, run in runs.items():
        m, hist = run["metrics"], run.get("history", [])
        ppl = float(m["ppl_wikitext2"])
        zs = {k: float(v) for k, v in (m.get("zero_shot") or {}).items()}
        rows.append({
            "method": name,
            "train_method": m.get("method"),
            "ppl": ppl,
            "gap_closed": gap_closed(ppl, ppl_sgpt, ppl_dense),
            "zero_shot": zs,
            "zero_shot_mean": sum(zs.values()) / len(zs) if zs else None,
            "tokens": int(m.get("tokens_trained", 0)),
            "train_s": train_seconds(hist, steps),
            "flip_rate_final": float(m.get("flip_rate_final", 0.0)) if name in ADAPTIVE else None,
        })
    return rows


def build_report(runs: dict[str, dict[str, Any]], *, cfg: PipelineConfig, params: str, command: str,
                 stamp_: dict, wall_s: float | None = None) -> dict[str, Any]:
    """Everything ``ladder.json`` holds (pure: tests build it from synthetic runs)."""
    budget = budget_of(cfg)
    windows = next((r["metrics"].get("ppl_windows") for r in runs.values() if "ppl_windows" in r["metrics"]), None)
    zs = cfg.evaluate.zero_shot
    return {
        "stamp": stamp_,
        "params": params,
        "model": cfg.model.student,
        "command": command,
        "budget": budget,
        "evaluation": {"wikitext2_windows": windows, "seq_len": cfg.evaluate.seq_len,
                       "max_windows": cfg.evaluate.max_windows,
                       "zero_shot": {"enabled": zs.enabled, "tasks": list(zs.tasks) if zs.enabled else [],
                                     "limit": zs.limit},
                       "val_blocks": cfg.data.val_blocks, "val_seq_len": cfg.data.seq_len,
                       "val_every": cfg.train.eval_every},
        "teacher_cache": {"enabled": cfg.teacher_cache.enabled, "format": cfg.teacher_cache.format,
                          "k": cfg.teacher_cache.k, "samples": cfg.teacher_cache.samples},
        "rows": ladder_rows(runs, budget["steps"]),
        "curves": {name: curve(r.get("history", [])) for name, r in runs.items() if name in CURVE_METHODS},
        "wall_s": wall_s,
    }


# ----------------------------------------------------------------------------- rendering

def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def budget_line(r: dict[str, Any]) -> str:
    b, e, tc = r["budget"], r["evaluation"], r["teacher_cache"]
    kd = f"teacher cache {cache_label(tc)}" if tc["enabled"] else "online teacher"
    return (f"Budget: every trained method {b['steps']} steps × {b['batch']}×{b['seq_len']} tokens = "
            f"{b['tokens']:,} tokens (same blocks, same order, seed fixed; KD from the {kd}); "
            f"validation perplexity on {e['val_blocks']}×{e['val_seq_len']} held-out tokens every "
            f"{e['val_every']} steps.")


def evaluation_line(r: dict[str, Any]) -> str:
    e = r["evaluation"]
    zs = e["zero_shot"]
    if zs["enabled"]:
        limit = f"first {zs['limit']} items per task" if zs["limit"] else "all items"
        zs_txt = f"zero-shot accuracy on {', '.join(zs['tasks'])} (local data, {limit})"
    else:
        zs_txt = "zero-shot off"
    return (f"Evaluation: WikiText-2 test perplexity over {e['wikitext2_windows']} windows × {e['seq_len']} "
            f"tokens; {zs_txt}.")


def ladder_table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: perplexity, gap closed, zero-shot per task + mean, tokens, time, flips."""
    tasks = sorted({t for r in rows for t in r["zero_shot"]})
    head = (["method", "WikiText-2 ppl", "gap closed vs SparseGPT"] + [f"{t} acc" for t in tasks]
            + (["zero-shot mean"] if tasks else []) + ["tokens trained", "train s", "final flip rate"])
    body = []
    for r in rows:
        cells = [r["method"], f"{r['ppl']:.2f}", _fmt(r["gap_closed"], ".1%")]
        cells += [_fmt(r["zero_shot"].get(t), ".3f") for t in tasks]
        if tasks:
            cells.append(_fmt(r["zero_shot_mean"], ".3f"))
        cells += [f"{r['tokens']:,}", _fmt(r["train_s"], ".0f"), _fmt(r["flip_rate_final"], ".3%")]
        body.append(cells)
    return markdown_table(head, body)


def render_markdown(r: dict[str, Any]) -> str:
    s = r["stamp"]
    return "\n".join([
        f"## Method ladder: {r['model']}, 2:4 sparsity",
        "",
        f"Measured {s.get('date')} on {s.get('machine')} (commit {s.get('commit')}, torch {s.get('torch')}, "
        f"{s.get('threads')} threads); params `{r['params']}`.",
        "",
        budget_line(r),
        "",
        evaluation_line(r),
        "",
        ladder_table(r["rows"]),
        "gap closed = (ppl_SparseGPT − ppl) / (ppl_SparseGPT − ppl_dense): 0 is one-shot SparseGPT, 100% the "
        "dense model. ast-ste is AST-Naive with λ_max = 0 (straight-through estimator + mask refresh, no "
        "decay). train s: measured step time (validation excluded); final flip rate: share of mask bits "
        "changed at the last refresh (methods that refresh only).",
        "",
        "Plots: `ladder.png` (perplexity), `ladder_curve.png` (validation perplexity vs tokens).",
        "",
        f"Command: `{r['command']}`",
        "",
    ])


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``ladder.json``, ``ladder.md``, ``ladder.png``, ``ladder_curve.png`` (each written atomically)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "ladder.json", report)
    atomic_write_text(out_dir / "ladder.md", render_markdown(report))
    rows = report["rows"]
    b = report["budget"]
    bars = plotting.bar_plot(out_dir / "ladder.png", [r["method"] for r in rows], [r["ppl"] for r in rows],
                             title=f"WikiText-2 perplexity, 2:4 ({b['tokens']:,} training tokens; lower is better)",
                             ylabel="perplexity (log scale)", logy=True)
    series = {name: ([p[0] for p in pts], [p[1] for p in pts]) for name, pts in report["curves"].items()}
    lines = plotting.line_plot(out_dir / "ladder_curve.png", series,
                               title="validation perplexity vs training tokens (fixed held-out blocks)",
                               xlabel="training tokens", ylabel="perplexity (log scale)", logy=True)
    return [out_dir / "ladder.json", out_dir / "ladder.md", bars, lines]


# ----------------------------------------------------------------------------- running

def variants(only: list[str] | None) -> list[Variant]:
    names = [n for n in VARIANTS if not only or n in only]
    return [Variant(n, list(VARIANTS[n])) for n in names]


def as_runs(results: dict[str, VariantResult]) -> dict[str, dict[str, Any]]:
    return {name: {"metrics": r.metrics, "history": r.history} for name, r in results.items()}


def bench_parser(script: str, doc: str, steps: int, work: str) -> argparse.ArgumentParser:
    """The options every training benchmark takes: preset, step budget, overrides, output and work dirs."""
    ap = argparse.ArgumentParser(prog=f"bench/{script}", description=doc.split("\n")[0])
    ap.add_argument("--params", default=DEFAULT_PARAMS)
    ap.add_argument("--steps", type=int, default=steps, help="training steps of every trained run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied after the bench's own settings (repeatable)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=WORK / work, help="run directories (resumable)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = bench_parser("ladder.py", __doc__, steps=100, work="ladder")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="NAME",
                    help=f"run only these rungs ({', '.join(VARIANTS)})")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- report section

LADDER_ORDER = ("ast-boosted", "ast-naive", "naive", "oneshot-sparsegpt")


def render_body(d: dict, image: Callable[[str, str], str]) -> Body:
    b, rows = d["budget"], d["rows"]
    ev = d.get("evaluation", {})
    tc = d.get("teacher_cache", {})
    kd = (f"teacher cache {cache_label(tc)}" if tc.get("enabled", True) else "online teacher")
    lines = [f"Model `{d.get('model', '?')}`, params `{d.get('params', '?')}`. **Budget: every trained method "
             f"{b['steps']} steps × {b['batch']}×{b['seq_len']} tokens = {b['tokens']:,} tokens** (same blocks in "
             f"the same order, same seed; KD from the {kd}).", ""]
    if ev:
        zs = ev.get("zero_shot", {})
        zs_txt = (f"zero-shot accuracy on {', '.join(zs.get('tasks', []))}"
                  + (f" (first {zs['limit']} items per task)" if zs.get("limit") else " (all items)")
                  if zs.get("enabled") else "zero-shot off")
        lines += [f"Evaluation: WikiText-2 test perplexity over {ev.get('wikitext2_windows', '?')} windows × "
                  f"{ev.get('seq_len', '?')} tokens; {zs_txt}.", ""]
    tasks = sorted({t for r in rows for t in (r.get("zero_shot") or {})})
    head = (["method", "WikiText-2 ppl", "gap closed vs SparseGPT"] + [f"{t}" for t in tasks]
            + (["zero-shot mean"] if tasks else []) + ["tokens trained", "train s", "final flip rate"])
    body = []
    for r in rows:
        cells = [r["method"], fmt(r["ppl"]), fmt(r.get("gap_closed"), ".1%")]
        cells += [fmt((r.get("zero_shot") or {}).get(t), ".3f") for t in tasks]
        if tasks:
            cells.append(fmt(r.get("zero_shot_mean"), ".3f"))
        cells += [f"{int(r.get('tokens') or 0):,}", fmt(r.get("train_s"), ".0f"), fmt(r.get("flip_rate_final"), ".3%")]
        body.append(cells)
    lines += [markdown_table(head, body),
              "gap closed = (ppl_SparseGPT − ppl) / (ppl_SparseGPT − ppl_dense): 0 is one-shot SparseGPT, 100% the "
              "dense model. `ast-ste` is AST-Naive with λ_max = 0 (STE + mask refresh, no decay).", ""]
    lines += [image("ladder.png", "WikiText-2 perplexity per method"),
              image("ladder_curve.png", "validation perplexity vs training tokens")]
    ppl = {r["method"]: r["ppl"] for r in rows}
    present = [m for m in LADDER_ORDER if ppl.get(m) is not None]
    chain = " < ".join(f"{m} {ppl[m]:.2f}" for m in present)
    met = all(ppl[a] < ppl[b_] for a, b_ in zip(present, present[1:])) if len(present) >= 2 else None
    verdicts = [Verdict("perplexity AST-Boosted < AST-Naive < naive retraining < SparseGPT one-shot",
                        chain.replace(" < ", ", ") if present else "no rows", met)]
    return Body("\n".join(lines), verdicts)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    chosen = variants(args.only)
    try:
        run = run_bench("ladder", resolve_params(args.params), args.steps, [f"train.t0_steps={args.steps // 4}"],
                        args.overrides, chosen, args.work, f"{len(chosen)} rung(s)")
    except (ConfigError, StageError) as err:
        return fail(err)
    report = build_report(as_runs(run.results), cfg=run.cfg, params=args.params,
                          command=command_line("ladder.py", argv), stamp_=run.stamp, wall_s=run.wall_s)
    written = write_outputs(report, args.out_dir)
    print(ladder_table(report["rows"]), end="")
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
