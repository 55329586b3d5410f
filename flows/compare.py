"""The ``compare`` Prefect flow: every method side by side on the same data and teacher cache.

Why one shared base: the comparison is only fair if every method trains on the
same token blocks and distils from the same teacher targets, and building them
once saves the most expensive preparation. ``prepare`` and ``cache-teacher`` run
once in ``<out>/shared/``; each method then gets ``<out>/<method>/`` whose
``prepare/`` files and ``cache_teacher/cache`` are relative symlinks into the
shared base, and runs the ``ast-pipeline`` flow there as a subflow (``train.method``
overridden). Its ``prepare`` sees a matching fingerprint and skips; its
``cache-teacher`` either finds the shared cache up to date (the cache
fingerprint covers format/k/samples/temperature/seed + data + teacher, never
the method) or, for methods without a teacher, marks itself skipped in the
method's own directory. Links are per file / per cache directory, never the
whole stage directory, so a stage's ``done.json`` written in one method's
directory cannot overwrite the shared one (atomic writes replace the link, not
its target; a cache rebuild through the link refuses to remove a symlink).

Output: ``<out>/compare.md``, ``compare.json`` and ``compare.png`` (perplexity,
share of the SparseGPT-to-dense perplexity gap closed, zero-shot mean, tokens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow

from ast_core.atomic import atomic_path, atomic_write_json, atomic_write_text
from ast_core.registry import METHOD_NAMES
from tasks.common import REPO_ROOT, configure_threads
from tasks.shared import open_shared, open_variant
from tasks.config import PipelineConfig, load_config
from tasks.tables import gap_closed, markdown_table

from flows.ast_pipeline import ast_pipeline, run_stage_task, run_stages

log = logging.getLogger("ast_pipeline")

METHODS = METHOD_NAMES  # every method of the registry, in its order
SHARED_METHOD = "ast-boosted"  # a method with a teacher, so the shared base builds the cache


# ----------------------------------------------------------------------------- table

def _zero_shot_mean(m: dict) -> float | None:
    accs = list((m.get("zero_shot") or {}).values())
    return sum(accs) / len(accs) if accs else None


def comparison_rows(results: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per method (``metrics.json`` contents in, plain JSON values out), in METHODS order.

    ``gap_closed`` = (ppl_sparsegpt - ppl) / (ppl_sparsegpt - ppl_dense): 0 for
    SparseGPT itself, 1 for the dense model; ``None`` when either reference is
    missing or they coincide.
    """
    order = [m for m in METHODS if m in results] + [m for m in results if m not in METHODS]
    if "dense" in results:
        ppl_dense = results["dense"]["ppl_wikitext2"]
    else:
        ppl_dense = next((m["ppl_wikitext2_dense"] for m in results.values() if "ppl_wikitext2_dense" in m), None)
    ppl_sgpt = results.get("oneshot-sparsegpt", {}).get("ppl_wikitext2")
    rows = []
    for method in order:
        m = results[method]
        ppl = float(m["ppl_wikitext2"])
        rows.append({
            "method": method,
            "ppl": ppl,
            "gap_closed": gap_closed(ppl, ppl_sgpt, ppl_dense),
            "zero_shot_mean": _zero_shot_mean(m),
            "tokens": int(m.get("tokens_trained", 0)),
        })
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def comparison_table(results: dict[str, dict]) -> str:
    """The markdown comparison table (what ``compare.md`` holds)."""
    return markdown_table(["method", "WikiText-2 ppl", "gap closed vs SparseGPT", "zero-shot mean", "tokens"],
                          [[r["method"], f"{r['ppl']:.2f}", _fmt(r["gap_closed"], ".1%"),
                            _fmt(r["zero_shot_mean"], ".4f"), f"{r['tokens']:,}"]
                           for r in comparison_rows(results)])


def comparison_chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Bar charts of perplexity and zero-shot mean per method, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display on servers and workers
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ppl_bars = axes[0].bar(names, [r["ppl"] for r in rows], color="tab:blue")
    axes[0].bar_label(ppl_bars, fmt="%.2f", fontsize=8)
    axes[0].set_title("WikiText-2 perplexity (lower is better)")
    zs = [r["zero_shot_mean"] if r["zero_shot_mean"] is not None else 0.0 for r in rows]
    zs_bars = axes[1].bar(names, zs, color="tab:green")
    axes[1].bar_label(zs_bars, fmt="%.3f", fontsize=8)
    axes[1].set_title("zero-shot mean accuracy (higher is better)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=35)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_comparison(out: Path, results: dict[str, dict], failed: dict[str, str]) -> dict[str, Any]:
    rows = comparison_rows(results)
    report = {"rows": rows, "failed": failed}
    atomic_write_json(out / "compare.json", report)
    md = comparison_table(results)
    if failed:
        md += "\nFailed: " + "; ".join(f"{m} ({msg})" for m, msg in failed.items()) + "\n"
    atomic_write_text(out / "compare.md", md)
    if rows:
        comparison_chart(rows, out / "compare.png")
    return report


def method_configs(params: str, overrides: list[str], methods: list[str]) -> dict[str, PipelineConfig]:
    """Every method's config, validated before any work (an unknown method names train.method)."""
    return {m: load_config(params, [*overrides, f"train.method={m}"]) for m in methods}


# ----------------------------------------------------------------------------- flow

@flow(name="compare", log_prints=True, persist_result=False)
def compare(params: str = "params/smollm2-quick.yaml", out: str | None = None,
            overrides: list[str] | None = None, methods: list[str] | None = None,
            resume: bool = False) -> dict:
    """Run ``methods`` (default: every method of the registry) on one data set and teacher cache; write the table.

    A method that fails is listed under ``failed`` in the table and the flow run
    fails after the table of the others is written.
    """
    logging.getLogger("ast_pipeline").setLevel(logging.INFO)
    configure_threads()
    overrides = list(overrides or [])
    methods = list(methods or METHODS)
    cfgs = method_configs(params, overrides, methods)
    shared_cfg = load_config(params, [*overrides, f"train.method={SHARED_METHOD}"])
    root = Path(out).resolve() if out else REPO_ROOT / "artifacts" / f"compare-{shared_cfg.name}"
    shared = open_shared(shared_cfg, root, lambda ctx, stage: run_stages(ctx, run_stage_task, (stage,)))

    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for method in methods:
        ctx = open_variant(shared, cfgs[method], root, method)
        state = ast_pipeline.with_options(flow_run_name=f"compare-{method}")(
            params=params, out=str(ctx.out), overrides=[*overrides, f"train.method={method}"],
            resume=resume, return_state=True)
        if state.is_completed():
            results[method] = json.loads((ctx.out / "metrics.json").read_text())
        else:
            failed[method] = state.message or state.name
            log.error("compare: %s failed: %s", method, failed[method])
    report = write_comparison(root, results, failed)
    print(comparison_table(results))
    if failed:
        raise RuntimeError(f"compare: {len(failed)} method(s) failed: {', '.join(failed)} "
                           f"(table of the others in {root / 'compare.md'})")
    return report


if __name__ == "__main__":
    compare()
