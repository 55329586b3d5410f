"""The fair ladder's headline evaluation: the whole WikiText-2 test split and zero-shot at ≥ 500 items per task.

An evaluation job loads a finished training job's export the stock way (transformers, + peft for an
adapter) and scores every WikiText-2 test window; the windows the training job scored must give the
per-window losses it recorded (so this is that job's model), the rest extend them to the whole
split. Then lm-eval runs the preset's tasks with ``limit`` items each (the whole task when it has
fewer), each item's score kept. Perplexity comes with a bootstrap interval over windows and a
paired ratio to the rung's fixed-mask control; accuracy with lm-eval's standard error and the
difference to the control, a paired bootstrap over the items both answered, pooled over the tasks
(a task weighs by its number of items).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ast_core.intervals import paired_diff_interval, ppl_interval, ppl_ratio_interval
from tasks.common import StageError
from tasks.tables import markdown_table

EVAL_RUNGS = ("fixed-kd-u2", "ast-official", "fixed-kd", "ast-default", "dense", "oneshot-sparsegpt", "ast-paper")
"""The rungs given the headline evaluation (the first budget, the first seed), in priority order: the decisive
pairs (each AST setting with its fixed-mask control), then the references."""

CHECK_TOL = 1e-4
"""The export must score each window the job recorded within 1e-4 nats of it (another rung of the ladder differs
by ~1e-2 on average; the same model in the same process shape by ~1e-7)."""


class ExportMissing(StageError):
    """The training job's export is not on disk (its run folder was removed): the evaluation is skipped."""


def export_dirs(work: Path, steps: int, seed: int, rung: str) -> tuple[Path, Path | None]:
    """The job's export as a user takes it: the model folder and, for SLoRB rungs, its PEFT adapter."""
    hf = Path(work) / f"steps{steps}" / f"seed{seed}" / rung / "export" / "hf"
    adapter = hf / "adapter"
    return hf, adapter if adapter.is_dir() else None


def run_eval(work: Path, record: dict, tasks: list[str], limit: int, batch_size: int,
             commit: str | None, max_windows: int | None = None) -> dict[str, Any]:
    """Score one finished training job's export on the whole split (``max_windows``: fewer, for tests) and
    zero-shot; returns the record (per-window losses and per-item scores included)."""
    from transformers import AutoTokenizer

    from ast_core.adapter import load_exported
    from ast_core.perplexity import wikitext2_perplexity
    from ast_core.zeroshot import zero_shot_result

    job = record["job"]
    hf, adapter = export_dirs(work, job["steps"], job["seed"], job["rung"])
    if not (hf / "config.json").is_file():
        raise ExportMissing(f"evaluation of {job}: no export at {hf} (the job's run folder is gone); "
                            "re-run the training job, or leave this rung out")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.perf_counter()
    model = load_exported(hf, adapter)
    tok = AutoTokenizer.from_pretrained(str(hf))
    want = record["metrics"].get("ppl_window_nll") or []
    seq_len = record["config"]["evaluate"]["seq_len"]
    full = wikitext2_perplexity(model, tok, seq_len=seq_len, max_windows=max_windows, progress=True)
    got = list(full.window_nll)
    worst = max((abs(a - b) for a, b in zip(got, want)), default=float("inf"))
    if not want or len(got) < len(want) or worst > CHECK_TOL:
        raise StageError(f"evaluation of {job}: the export at {hf} scores the job's {len(want)} windows up to "
                         f"{worst:.2e} nats away from what the job recorded; it is not the model the job measured")
    r = zero_shot_result(model, tok, tasks, limit=limit, batch_size=batch_size, items=True)
    return {"job": job, "started": started, "commit_at_start": commit, "tasks": list(tasks), "limit": limit,
            "export": str(hf), "adapter": str(adapter) if adapter else None,
            "ppl_seq_len": seq_len, "ppl_windows": len(got), "ppl": full.ppl, "ppl_ci95": list(ppl_interval(got)),
            "window_nll": got, "recorded_windows_max_abs_diff": worst,
            "acc": r.scores, "stderr": r.stderr, "docs": r.counts, "items": r.items,
            "wall_s": time.perf_counter() - t0}


def summarize(records: list[dict], control_of: Callable[[str], str | None], order: tuple[str, ...],
              references: tuple[str, ...] = ()) -> list[dict]:
    """One row per (budget, seed, rung): whole-split perplexity with its interval and paired ratio to the rung's
    fixed-mask control; accuracy ± stderr per task, the mean over tasks, and the paired difference in per-item
    accuracy to the control (when both were scored on the same windows / items). ``references`` (the untrained
    rungs) are compared with no control."""
    by = {(r["job"]["steps"], r["job"]["seed"], r["job"]["rung"]): r for r in records}
    rows = []
    for (steps, seed, rung), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]))):
        control = control_of(rung)
        c = by.get((steps, seed, control)) if rung not in references else None
        diff = ratio = None
        if c is not None and rung != control and len(c["window_nll"]) == len(r["window_nll"]):
            ratio = ppl_ratio_interval(r["window_nll"], c["window_nll"])
        if c is not None and rung != control and c["tasks"] == r["tasks"] and c["docs"] == r["docs"]:
            a = [x for t in r["tasks"] for x in r["items"][t]]
            b = [x for t in c["tasks"] for x in c["items"][t]]
            diff = paired_diff_interval(a, b)
        rows.append({"steps": steps, "seed": seed, "rung": rung, "ppl": r["ppl"], "ppl_ci95": r["ppl_ci95"],
                     "ppl_windows": r["ppl_windows"], "ppl_ratio_to_control": ratio, "tasks": r["tasks"], "acc": r["acc"],
                     "stderr": r["stderr"], "docs": r["docs"],
                     "mean_acc": sum(r["acc"].values()) / len(r["acc"]),
                     "items": sum(r["docs"].values()), "control": control, "diff_to_control": diff})
    return rows


def ppl_table(rows: list[dict]) -> str:
    head = ["budget (steps)", "seed", "rung", "WikiText-2 ppl, whole test split [95% CI]",
            "ppl / its fixed-mask control, paired [95% CI]"]
    body = []
    for r in rows:
        q = r["ppl_ratio_to_control"]
        body.append([str(r["steps"]), str(r["seed"]), r["rung"],
                     f"{r['ppl']:.2f} [{r['ppl_ci95'][0]:.2f}, {r['ppl_ci95'][1]:.2f}]",
                     f"{q[0]:.3f} [{q[1]:.3f}, {q[2]:.3f}] (vs {r['control']})" if q else "—"])
    return markdown_table(head, body, align="rrlrl")


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
        if d is None or not (r["rung"].startswith("ast-") or r["rung"] == "fixed-kd-u2"):
            continue
        word = "better than" if d[1] > 0 else "worse than" if d[2] < 0 else "no measurable difference from"
        out.append(f"{r['steps']} steps, seed {r['seed']}, {r['rung']}: zero-shot {word} {r['control']} "
                   f"({d[0]:+.3f} per item over {r['items']} items, paired 95% interval [{d[1]:+.3f}, {d[2]:+.3f}])")
    return out


def render(rows: list[dict], limit: int | None) -> list[str]:
    """The report's headline-evaluation sections (lines), empty before any evaluation job has run."""
    if not rows:
        return []
    return ["### Headline rows: the whole WikiText-2 test split", "",
            f"{rows[0]['ppl_windows']} windows × 512 tokens, each rung's export loaded the stock way; the windows the "
            "training job scored were checked to give the losses it recorded (within 1e-4 nats).", "",
            ppl_table(rows), "",
            "### Zero-shot", "",
            f"lm-eval 0.4.13, 0-shot `acc`, the first {limit} items of each task (the whole task when it has fewer), "
            "on each rung's export loaded the stock way; ± is lm-eval's standard error. The difference to the "
            "fixed-mask control is paired per item, pooled over the tasks.", "",
            table(rows), *[f"- {v}" for v in verdicts(rows)], ""]
