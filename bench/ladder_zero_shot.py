"""Zero-shot accuracy of the fair ladder's rungs: ≥ 500 items per task, each item kept, rungs paired per item.

A zero-shot job loads a finished training job's export the stock way (transformers, + peft for an
adapter), first checks that it is that job's model (its first WikiText-2 windows must score the
per-window losses the job recorded), then runs lm-eval on the preset's tasks with ``limit`` items
each (the whole task when it has fewer). Accuracy comes with lm-eval's standard error; the
difference to the rung's fixed-mask control is a paired bootstrap over the items both answered,
pooled over the tasks (so a task weighs by its number of items).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ast_core.intervals import paired_diff_interval
from tasks.common import StageError
from tasks.tables import markdown_table

ZS_RUNGS = ("dense", "oneshot-sparsegpt", "fixed-kd", "fixed-kd-u2", "ast-default", "ast-official", "ast-paper")
"""The rungs scored zero-shot (the first budget, the first seed): the references and the decisive rungs."""

CHECK_WINDOWS, CHECK_TOL = 2, 1e-4
"""The export must score the job's recorded mean NLL on its first 2 windows within 1e-4 nats (another rung of
the ladder differs by ~1e-2; the same model in another batch shape by ~1e-6)."""


def export_dirs(work: Path, steps: int, seed: int, rung: str) -> tuple[Path, Path | None]:
    """The job's export as a user takes it: the model folder and, for SLoRB rungs, its PEFT adapter."""
    hf = Path(work) / f"steps{steps}" / f"seed{seed}" / rung / "export" / "hf"
    adapter = hf / "adapter"
    return hf, adapter if adapter.is_dir() else None


def run_zero_shot(work: Path, record: dict, tasks: list[str], limit: int, batch_size: int,
                  commit: str | None) -> dict[str, Any]:
    """Score one finished training job's export; returns the zero-shot record (per-item scores included)."""
    from transformers import AutoTokenizer

    from ast_core.adapter import load_exported
    from ast_core.perplexity import wikitext2_perplexity
    from ast_core.zeroshot import zero_shot_result

    job = record["job"]
    hf, adapter = export_dirs(work, job["steps"], job["seed"], job["rung"])
    if not (hf / "config.json").is_file():
        raise StageError(f"zero-shot of {job}: no export at {hf} (the job's run folder is gone); "
                         "re-run the training job, or leave this rung out")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    model = load_exported(hf, adapter)
    tok = AutoTokenizer.from_pretrained(str(hf))
    want = record["metrics"].get("ppl_window_nll") or []
    got = wikitext2_perplexity(model, tok, seq_len=record["config"]["evaluate"]["seq_len"],
                               max_windows=CHECK_WINDOWS).window_nll
    if len(want) < CHECK_WINDOWS or max(abs(a - b) for a, b in zip(got, want)) > CHECK_TOL:
        raise StageError(f"zero-shot of {job}: the export at {hf} scores window losses {list(got)}, the job "
                         f"recorded {want[:CHECK_WINDOWS]}; it is not the model the job measured")
    r = zero_shot_result(model, tok, tasks, limit=limit, batch_size=batch_size, items=True)
    return {"job": job, "started": started, "commit_at_start": commit, "tasks": list(tasks), "limit": limit,
            "export": str(hf), "adapter": str(adapter) if adapter else None,
            "export_check_window_nll": [list(got), want[:CHECK_WINDOWS]],
            "acc": r.scores, "stderr": r.stderr, "docs": r.counts, "items": r.items,
            "wall_s": time.perf_counter() - t0}


def summarize(records: list[dict], control_of: Callable[[str], str], order: tuple[str, ...]) -> list[dict]:
    """One row per (budget, seed, rung): accuracy ± stderr per task, the mean over tasks, and the paired
    difference in per-item accuracy to the rung's fixed-mask control (when both were scored on the same items)."""
    by = {(r["job"]["steps"], r["job"]["seed"], r["job"]["rung"]): r for r in records}
    rows = []
    for (steps, seed, rung), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))):
        control = control_of(rung)
        c = by.get((steps, seed, control))
        diff = None
        if c is not None and rung != control and c["tasks"] == r["tasks"] and c["docs"] == r["docs"]:
            a = [x for t in r["tasks"] for x in r["items"][t]]
            b = [x for t in c["tasks"] for x in c["items"][t]]
            diff = paired_diff_interval(a, b)
        rows.append({"steps": steps, "seed": seed, "rung": rung, "tasks": r["tasks"], "acc": r["acc"],
                     "stderr": r["stderr"], "docs": r["docs"],
                     "mean_acc": sum(r["acc"].values()) / len(r["acc"]),
                     "items": sum(r["docs"].values()), "control": control, "diff_to_control": diff})
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    tasks = rows[0]["tasks"]
    head = ["budget (steps)", "seed", "rung", *[f"{t} (n={rows[0]['docs'][t]})" for t in tasks], "mean over tasks",
            "per-item accuracy − its fixed-mask control, paired [95% CI]"]
    body = []
    for r in rows:
        cells = [f"{r['acc'][t]:.3f} ± {r['stderr'][t]:.3f}" if r["stderr"].get(t) is not None
                 else f"{r['acc'][t]:.3f}" for t in tasks]
        d = r["diff_to_control"]
        body.append([str(r["steps"]), str(r["seed"]), r["rung"], *cells, f"{r['mean_acc']:.3f}",
                     f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] (vs {r['control']})" if d else "—"])
    return markdown_table(head, body, align="rrl" + "r" * (len(head) - 3))


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        d = r["diff_to_control"]
        if d is None or not r["rung"].startswith("ast-"):
            continue
        word = "better than" if d[1] > 0 else "worse than" if d[2] < 0 else "no measurable difference from"
        out.append(f"{r['steps']} steps, seed {r['seed']}, {r['rung']}: zero-shot {word} {r['control']} "
                   f"({d[0]:+.3f} per item over {r['items']} items, paired 95% interval [{d[1]:+.3f}, {d[2]:+.3f}])")
    return out


def render(rows: list[dict], limit: int | None) -> list[str]:
    """The report's zero-shot section (lines), empty before any zero-shot job has run."""
    if not rows:
        return []
    return ["### Zero-shot", "",
            f"lm-eval 0.4.13, 0-shot `acc`, the first {limit} items of each task (the whole task when it has fewer), "
            "on each rung's export loaded the stock way; ± is lm-eval's standard error. The difference to the "
            "fixed-mask control is paired per item, pooled over the tasks.", "",
            table(rows), *[f"- {v}" for v in verdicts(rows)], ""]
