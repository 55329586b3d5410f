"""Stage 5, evaluate: WikiText-2 perplexity (the papers' way) and lm-eval zero-shot,
for the sparse model and its dense teacher; writes ``metrics.json`` and a
markdown table with deltas.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ast_core.trained import load_trained
from ast_core.atomic import atomic_write_json, atomic_write_text
from ast_core.embedded import cache_root
from ast_core.models import load_tokenizer, tokenizer_fingerprint
from ast_core.perplexity import wikitext2_perplexity
from ast_core.teacher_cache import weights_hash

from . import cache_teacher
from .common import RunContext, hash_json, log
from .tables import markdown_table


def fingerprint(ctx: RunContext) -> str:
    return hash_json({"train": ctx.require("train")["fingerprint"],
                      "evaluate": ctx.cfg.evaluate.model_dump(mode="json")})


def _measure(ctx: RunContext, model, tok) -> dict:
    e = ctx.cfg.evaluate
    ppl = wikitext2_perplexity(model, tok, seq_len=e.seq_len, max_windows=e.max_windows, progress=ctx.progress)
    out = {"ppl": ppl.ppl, "windows": ppl.windows, "ppl_ci95": list(ppl.interval) if ppl.interval else None,
           "window_nll": list(ppl.window_nll)}
    if e.zero_shot.enabled:
        from ast_core.zeroshot import zero_shot
        out["zero_shot"] = zero_shot(model, tok, e.zero_shot.tasks, limit=e.zero_shot.limit,
                                     batch_size=e.zero_shot.batch_size)
    else:
        out["zero_shot"] = {}
    return out


_EVAL_CODE = ("ast_core/perplexity.py", "ast_core/zeroshot.py", "ast_core/data.py", "tasks/evaluate.py")


def _code_hash() -> str:
    """The evaluation code's own hash: a change to how we measure invalidates cached dense results."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for rel in _EVAL_CODE:
        h.update((root / rel).read_bytes())
    for f in sorted((root / "ast_core" / "lm_eval_tasks").glob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def dense_cache_path(ctx: RunContext, teacher, tok) -> Path:
    """Where the dense teacher's scores live, keyed by everything that decides them.

    The dense model is measured the same way by every run that shares a teacher
    (methods side by side, sweeps, re-runs), so it is measured once per
    (weights, tokenizer, evaluate settings, evaluation code, data mirror).
    """
    from ast_core.data import data_mirror
    key = hashlib.sha256(json.dumps({
        "weights": weights_hash(teacher), "tokenizer": tokenizer_fingerprint(tok),
        "evaluate": ctx.cfg.evaluate.model_dump(mode="json"), "code": _code_hash(),
        "mirror": str(data_mirror()),
    }, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / "dense_eval" / f"{key}.json"


def _measure_dense(ctx: RunContext, tok) -> dict:
    teacher = cache_teacher.load_teacher(ctx)
    if os.environ.get("AST_DENSE_CACHE", "on") == "off":
        return _measure(ctx, teacher, tok)
    path = dense_cache_path(ctx, teacher, tok)
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            log.info("evaluate: dense scores from %s", path)
            return cached
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache entry is measured again and rewritten
    dense = _measure(ctx, teacher, tok)
    try:
        atomic_write_json(path, dense)
    except OSError as err:  # a read-only cache costs a re-measure next time, never the run
        log.warning("evaluate: could not cache dense scores (%s)", err)
    return dense


def run(ctx: RunContext) -> dict:
    fp = fingerprint(ctx)
    if ctx.is_done("evaluate", fp):
        log.info("evaluate: up to date")
        return ctx.done("evaluate")["metrics"]
    c = ctx.cfg
    tok = load_tokenizer(c.model.student, c.model.trust_remote_code)
    ctx.require("train")
    sparse = _measure(ctx, load_trained(ctx.stage_dir("train") / "final", c.model.trust_remote_code), tok)
    dense = _measure_dense(ctx, tok)
    train_info = ctx.require("train")
    metrics = {
        "method": c.train.method,
        "model": c.model.student,
        "ppl_wikitext2": sparse["ppl"],
        "ppl_wikitext2_dense": dense["ppl"],
        "ppl_windows": sparse["windows"],
        # 95% bootstrap intervals over windows, and the sparse/dense ratio paired on the same windows
        "ppl_wikitext2_ci95": sparse.get("ppl_ci95"),
        "ppl_wikitext2_dense_ci95": dense.get("ppl_ci95"),
        "ppl_ratio_to_dense": _paired_ratio(sparse, dense),
        "ppl_window_nll": sparse.get("window_nll"),
        "ppl_seq_len": c.evaluate.seq_len,
        "zero_shot": sparse["zero_shot"],
        "zero_shot_dense": dense["zero_shot"],
        "tokens_trained": train_info.get("tokens_trained", 0),
        "flip_rate_final": train_info.get("flip_rate_final", 0.0),
    }
    compile_info = ctx.done("compile") or {}
    if "compressed" in compile_info:
        metrics["compressed_ratio"] = compile_info["compressed"].get("sparse_linear_ratio")
    atomic_write_json(ctx.out / "metrics.json", metrics)
    atomic_write_text(ctx.out / "metrics.md", table(metrics))
    ctx.mark_done("evaluate", fp, metrics=metrics)
    print(table(metrics))
    return metrics


def _paired_ratio(a: dict, b: dict) -> list[float] | None:
    """``[ppl_a/ppl_b, lo, hi]`` (paired bootstrap over the same windows), None without per-window losses."""
    from ast_core.intervals import ppl_ratio_interval
    wa, wb = a.get("window_nll") or [], b.get("window_nll") or []
    if len(wa) < 2 or len(wa) != len(wb):
        return None
    return list(ppl_ratio_interval(wa, wb))


def _ci(v: list[float] | None) -> str:
    return f" [{v[0]:.2f}, {v[1]:.2f}]" if v else ""


def table(m: dict) -> str:
    rows = [[f"WikiText-2 ppl ({m['ppl_windows']}×{m['ppl_seq_len']} tokens)",
             f"{m['ppl_wikitext2_dense']:.2f}{_ci(m.get('ppl_wikitext2_dense_ci95'))}",
             f"{m['ppl_wikitext2']:.2f}{_ci(m.get('ppl_wikitext2_ci95'))}",
             f"{m['ppl_wikitext2'] - m['ppl_wikitext2_dense']:+.2f}"]]
    for task, acc in m["zero_shot"].items():
        d = m["zero_shot_dense"].get(task, float("nan"))
        rows.append([f"{task} acc", f"{d:.4f}", f"{acc:.4f}", f"{acc - d:+.4f}"])
    return (markdown_table(["metric", "dense", m["method"], "delta"], rows)
            + "\n[lo, hi]: 95% bootstrap interval over the evaluation windows.\n")
