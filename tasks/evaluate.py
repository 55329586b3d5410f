"""Stage 5, evaluate: WikiText-2 perplexity (the papers' way) and lm-eval zero-shot,
for the sparse model and its dense teacher; writes ``metrics.json``, a markdown
table with deltas, and the model card of the export.

What is reported is what ships: the exported checkpoint, loaded the stock way
(``AutoModelForCausalLM.from_pretrained(export/hf)``, plus
``PeftModel.from_pretrained(..., export/hf/adapter)`` when SLoRB is an adapter:
``ast_core.adapter.load_exported``). The in-memory trained model (``train/final``)
is measured too, on the same windows and tasks, and the two must agree
(:func:`export_check`); the 2:4 base without its adapter is measured as well, so
the card can say what it alone scores.

Tolerance (:data:`PPL_RTOL`, :data:`ZERO_SHOT_ITEMS`). The exported model computes
the same function as the trained one; only the floating-point evaluation order
differs (the 0/1 ``lora_A`` matmul instead of a reshape-and-sum for the group sums,
``W ⊙ m`` stored instead of multiplied at run time, and PEFT runs a 16-bit base's
adapter in float32). Measured relative perplexity differences: 0 on the tiny
preset, 2.4e-7 for SmolLM2-135M with a 2:4 mask and SLoRB (float32, 4×512 windows),
7.6e-5 for the tiny model in bfloat16. So in float32 a difference above 1e-4 is not
noise but a different model (leaving out the adapter changes it by several percent),
and 16-bit models, whose rounding (bfloat16: 2^-8) is ~10^5 times coarser, get 1e-2. A zero-shot accuracy may differ by at most one document per task:
rounding noise can flip only an item whose choices tie within it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ast_core.adapter import load_exported
from ast_core.atomic import atomic_write_json, atomic_write_text
from ast_core.export import SPARSITY_FILE, exported_adapter
from ast_core.trained import load_trained
from ast_core.embedded import cache_root
from ast_core.models import load_tokenizer, tokenizer_fingerprint
from ast_core.perplexity import wikitext2_perplexity
from ast_core.teacher_cache import weights_hash

from . import cache_teacher, model_card
from .common import RunContext, StageError, hash_json, log
from .config import EvaluateConfig
from .tables import markdown_table

PPL_RTOL = {"float32": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
"""Largest relative perplexity difference between the trained and the exported model (module docstring)."""
ZERO_SHOT_ITEMS = 1
"""Largest zero-shot difference, in documents per task (module docstring)."""


class ExportMismatch(StageError):
    """The exported checkpoint does not score what the trained model scored."""


def fingerprint(ctx: RunContext) -> str:
    return hash_json({"train": ctx.require("train")["fingerprint"],
                      "compile": ctx.require("compile")["fingerprint"],
                      "evaluate": ctx.cfg.evaluate.model_dump(mode="json")})


def measure(model, tok, e: EvaluateConfig, progress: bool = False) -> dict:
    """WikiText-2 perplexity and zero-shot of ``model`` on the windows and tasks of ``e``."""
    ppl = wikitext2_perplexity(model, tok, seq_len=e.seq_len, max_windows=e.max_windows, progress=progress)
    out = {"ppl": ppl.ppl, "windows": ppl.windows, "ppl_ci95": list(ppl.interval) if ppl.interval else None,
           "window_nll": list(ppl.window_nll), "seq_len": e.seq_len}
    if e.zero_shot.enabled:
        from ast_core.zeroshot import zero_shot_counted
        out["zero_shot"], out["zero_shot_docs"] = zero_shot_counted(
            model, tok, e.zero_shot.tasks, limit=e.zero_shot.limit, batch_size=e.zero_shot.batch_size)
    else:
        out["zero_shot"], out["zero_shot_docs"] = {}, {}
    return out


def _measure(ctx: RunContext, model, tok) -> dict:
    return measure(model, tok, ctx.cfg.evaluate, ctx.progress)


def export_check(trained: dict, exported: dict, dtype: str) -> dict:
    """Compare the trained and the exported model's scores against the stated tolerance."""
    rtol = PPL_RTOL[dtype]
    rel = abs(exported["ppl"] / trained["ppl"] - 1.0)
    zs_diff = {t: abs(exported["zero_shot"].get(t, float("nan")) - acc) for t, acc in trained["zero_shot"].items()}
    zs_tol = {t: ZERO_SHOT_ITEMS / max(1, trained["zero_shot_docs"].get(t, 1)) + 1e-9 for t in zs_diff}
    bad = ([f"perplexity {exported['ppl']:.6g} exported vs {trained['ppl']:.6g} trained "
            f"(relative {rel:.2e} > {rtol:g})"] if not rel <= rtol else []) + \
          [f"{t} accuracy {exported['zero_shot'].get(t)} exported vs {trained['zero_shot'][t]} trained "
           f"(more than {ZERO_SHOT_ITEMS} document apart)" for t in zs_diff if not zs_diff[t] <= zs_tol[t]]
    summary = (f"perplexity relative difference {rel:.1e} (tolerance {rtol:g}, {dtype}); zero-shot largest "
               f"difference {max(zs_diff.values(), default=0.0):.3f} (tolerance {ZERO_SHOT_ITEMS} document per task)")
    return {"ok": not bad, "ppl_rel_diff": rel, "ppl_rtol": rtol, "dtype": dtype,
            "zero_shot_abs_diff": zs_diff, "zero_shot_tol_docs": ZERO_SHOT_ITEMS, "problems": bad,
            "summary": summary}


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
    with ctx.checked("train"):
        model = load_trained(ctx.stage_dir("train") / "final", c.model.trust_remote_code)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    check_n = c.evaluate.check_windows
    if check_n is None:  # the trained model on every window and task
        trained = _measure(ctx, model, tok)
    else:  # on the first check_n windows only (benchmarks: the export alone gets the whole slice)
        trained = measure(model, tok, c.evaluate.model_copy(update={
            "max_windows": min(check_n, c.evaluate.max_windows or check_n),
            "zero_shot": c.evaluate.zero_shot.model_copy(update={"enabled": False})}))
    del model
    hf = ctx.out / "export" / "hf"
    if not (hf / SPARSITY_FILE).is_file():
        raise StageError(f"no export in {hf}; run the compile stage first")
    adapter = exported_adapter(hf)
    log.info("evaluate: the export, loaded the stock way (%s%s)", hf, f" + {adapter}" if adapter else "")
    exported = _measure(ctx, load_exported(hf, adapter), tok)  # the export's own tokenizer files are the same
    base_only = None
    if adapter:
        base_only = (_measure(ctx, load_exported(hf), tok) if check_n is None else
                     measure(load_exported(hf), tok, c.evaluate.model_copy(update={
                         "max_windows": trained["windows"],
                         "zero_shot": c.evaluate.zero_shot.model_copy(update={"enabled": False})})))
    dense = _measure_dense(ctx, tok)
    check = export_check(trained, exported if check_n is None else _prefix(exported, trained["windows"]), dtype)
    train_info = ctx.require("train")
    metrics = {
        "method": c.train.method,
        "model": c.model.student,
        # the exported checkpoint (what ships), loaded with stock transformers (+ peft)
        "evaluated": "export/hf" + (" + export/hf/adapter" if adapter else ""),
        "ppl_wikitext2": exported["ppl"],
        "ppl_wikitext2_dense": dense["ppl"],
        "ppl_windows": exported["windows"],
        # 95% bootstrap intervals over windows, and the sparse/dense ratio paired on the same windows
        "ppl_wikitext2_ci95": exported.get("ppl_ci95"),
        "ppl_wikitext2_dense_ci95": dense.get("ppl_ci95"),
        "ppl_ratio_to_dense": _paired_ratio(exported, dense),
        "ppl_window_nll": exported.get("window_nll"),
        "ppl_seq_len": c.evaluate.seq_len,
        "zero_shot": exported["zero_shot"],
        "zero_shot_docs": exported["zero_shot_docs"],
        "zero_shot_dense": dense["zero_shot"],
        # the in-memory trained model (train/final) on the same windows and tasks
        "ppl_wikitext2_trained": trained["ppl"],
        "ppl_windows_trained": trained["windows"],  # fewer than ppl_windows with evaluate.check_windows
        "zero_shot_trained": trained["zero_shot"],
        # the 2:4 base without its SLoRB adapter (None when there is no adapter)
        "ppl_wikitext2_base_only": base_only["ppl"] if base_only else None,
        "zero_shot_base_only": base_only["zero_shot"] if base_only else None,
        "export_check": check,
        "tokens_trained": train_info.get("tokens_trained", 0),
        "flip_rate_final": train_info.get("flip_rate_final", 0.0),
    }
    compile_info = ctx.done("compile") or {}
    if "compressed" in compile_info:
        metrics["compressed_ratio"] = compile_info["compressed"].get("sparse_linear_ratio")
    atomic_write_json(ctx.out / "metrics.json", metrics)
    atomic_write_text(ctx.out / "metrics.md", table(metrics))
    if not check["ok"]:  # the numbers stay in metrics.json for inspection; the stage is not marked done
        raise ExportMismatch(f"the exported checkpoint {metrics['evaluated']} does not score what the trained "
                             f"model scored: {'; '.join(check['problems'])} (see {ctx.out / 'metrics.json'})")
    atomic_write_text(hf / "README.md", model_card.render(c, train_info, "adapter" if adapter else
                                                          _slorb_mode(hf), metrics))
    ctx.mark_done("evaluate", fp, metrics=metrics)
    print(table(metrics))
    return metrics


def _prefix(scores: dict, n: int) -> dict:
    """``scores`` restricted to its first ``n`` windows (perplexity only), to compare with a model scored on them."""
    import math
    nll = scores["window_nll"][:n]
    return {**scores, "ppl": math.exp(sum(nll) / len(nll)), "windows": n, "window_nll": nll,
            "zero_shot": {}, "zero_shot_docs": {}}


def _slorb_mode(hf: Path) -> str:
    return json.loads((hf / SPARSITY_FILE).read_text()).get("slorb", {}).get("mode", "none")


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
    out = (markdown_table(["metric", "dense", m["method"], "delta"], rows)
           + "\n[lo, hi]: 95% bootstrap interval over the evaluation windows.\n")
    if "export_check" in m:
        ev = m.get("evaluated", "export/hf")
        out += (f"\nThe {m['method']} column is the exported checkpoint ({ev}) loaded with stock transformers"
                f"{' + peft' if 'adapter' in ev else ''}. Trained model in memory: ppl "
                f"{m['ppl_wikitext2_trained']:.4f} ({model_card.windows_note(m)}); export check {'ok' if m['export_check']['ok'] else 'FAILED'}: "
                f"{m['export_check']['summary']}.\n")
        if m.get("ppl_wikitext2_base_only") is not None:
            out += (f"The 2:4 base without the SLoRB adapter: ppl {m['ppl_wikitext2_base_only']:.2f} "
                    f"({model_card.windows_note(m)}).\n")
        out += _tasks_hint(m)
    return out


def _tasks_hint(m: dict) -> str:
    if not m.get("zero_shot"):
        return ""
    try:
        from ast_core.zeroshot import include_path
        folder = include_path(list(m["zero_shot"]))
    except (ValueError, OSError):
        return ""
    return f"Stock lm-eval: `lm_eval --model hf --include_path {folder} --tasks {','.join(m['zero_shot'])} ...`\n"


def evaluate_model(cfg, path: str, adapter: str | None = None, tokenizer: str | None = None,
                   json_out: str | None = None) -> dict:
    """``ast-pipeline evaluate-model``: any checkpoint, loaded the stock way, on the windows and tasks of
    ``cfg.evaluate`` (the same ones the pipeline uses), so an export compares with models from elsewhere."""
    from transformers import AutoTokenizer

    p = Path(path)
    if adapter is not None and not Path(adapter).is_dir():
        raise StageError(f"--adapter {adapter}: no such directory")
    if p.exists() and not (p / "config.json").is_file():
        raise StageError(f"{p}: not a model directory (no config.json)")
    model = load_exported(path, adapter)  # refuses a broken or mismatched adapter (AdapterError)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or path)
    except (OSError, ValueError) as err:
        raise StageError(f"no tokenizer at {tokenizer or path} ({err}); pass --tokenizer") from err
    scores = measure(model, tok, cfg.evaluate)
    out = {"model": str(path), "adapter": adapter, "ppl_wikitext2": scores["ppl"],
           "ppl_wikitext2_ci95": scores["ppl_ci95"], "ppl_windows": scores["windows"],
           "ppl_seq_len": cfg.evaluate.seq_len, "zero_shot": scores["zero_shot"],
           "zero_shot_docs": scores["zero_shot_docs"], "params": cfg.name}
    if json_out:
        atomic_write_json(Path(json_out), out)
    lines = [f"{path}{' + ' + adapter if adapter else ''}",
             f"WikiText-2 ppl ({out['ppl_windows']}×{out['ppl_seq_len']} tokens): {out['ppl_wikitext2']:.4f}"
             f"{_ci(out['ppl_wikitext2_ci95'])}"]
    lines += [f"{t} acc ({out['zero_shot_docs'].get(t, '?')} docs): {a:.4f}" for t, a in out["zero_shot"].items()]
    print("\n".join(lines))
    return out
