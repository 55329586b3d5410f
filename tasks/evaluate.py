"""Stage 5, evaluate: WikiText-2 perplexity (the papers' way) and lm-eval zero-shot,
for the sparse model and its dense teacher; writes ``metrics.json`` and a
markdown table with deltas.
"""

from __future__ import annotations

from ast_core.checkpoint import atomic_write_json, atomic_write_text
from ast_core.models import load_tokenizer
from ast_core.perplexity import wikitext2_perplexity

from . import cache_teacher
from .common import RunContext, hash_json, log
from .train import load_trained


def fingerprint(ctx: RunContext) -> str:
    return hash_json({"train": ctx.require("train")["fingerprint"],
                      "evaluate": ctx.cfg.evaluate.model_dump(mode="json")})


def _measure(ctx: RunContext, model, tok) -> dict:
    e = ctx.cfg.evaluate
    ppl = wikitext2_perplexity(model, tok, seq_len=e.seq_len, max_windows=e.max_windows)
    out = {"ppl": ppl.ppl, "windows": ppl.windows}
    if e.zero_shot.enabled:
        from ast_core.zeroshot import zero_shot
        out["zero_shot"] = zero_shot(model, tok, e.zero_shot.tasks, limit=e.zero_shot.limit,
                                     batch_size=e.zero_shot.batch_size)
    else:
        out["zero_shot"] = {}
    return out


def run(ctx: RunContext) -> dict:
    fp = fingerprint(ctx)
    if ctx.is_done("evaluate", fp):
        log.info("evaluate: up to date")
        return ctx.done("evaluate")["metrics"]
    c = ctx.cfg
    tok = load_tokenizer(c.model.student, c.model.trust_remote_code)
    sparse = _measure(ctx, load_trained(ctx), tok)
    dense = _measure(ctx, cache_teacher.load_teacher(ctx), tok)
    train_info = ctx.require("train")
    metrics = {
        "method": c.train.method,
        "model": c.model.student,
        "ppl_wikitext2": sparse["ppl"],
        "ppl_wikitext2_dense": dense["ppl"],
        "ppl_windows": sparse["windows"],
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


def table(m: dict) -> str:
    rows = [f"| metric | dense | {m['method']} | delta |", "|---|---|---|---|",
            f"| WikiText-2 ppl ({m['ppl_windows']}×{m['ppl_seq_len']} tokens) | {m['ppl_wikitext2_dense']:.2f} "
            f"| {m['ppl_wikitext2']:.2f} | {m['ppl_wikitext2'] - m['ppl_wikitext2_dense']:+.2f} |"]
    for task, acc in m["zero_shot"].items():
        d = m["zero_shot_dense"].get(task, float("nan"))
        rows.append(f"| {task} acc | {d:.4f} | {acc:.4f} | {acc - d:+.4f} |")
    return "\n".join(rows) + "\n"
