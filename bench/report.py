"""Build ``docs/RESULTS.md`` from whatever the benchmarks left in ``bench/results`` (issue #6).

    python -m bench.report [--results bench/results] [--out docs/RESULTS.md] [--notes bench/notes]

Every section shows the command that produced it, the date of its stamp, its
table, its PNGs (relative links) and one verdict line per goal, computed from
the numbers ("met" / "missed"), followed by the hand-written explanation in
``bench/notes/<section>.md`` when there is one. A results file that is missing
or has an unexpected shape gives "not measured yet (run: ...)" instead of an
error: the report can be built at any time, also while benchmarks run.

Pure JSON → markdown (no torch): the benchmark scripts call the section
renderers here for their own ``.md`` files, so both read the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

from bench.labels import cache_label  # noqa: E402
from tasks.tables import markdown_table as table  # noqa: E402
RESULTS = REPO / "bench" / "results"
NOTES = REPO / "bench" / "notes"
OUT = REPO / "docs" / "RESULTS.md"

GOAL_STEP_OVERHEAD = 1.03   # AST step / plain masked fine-tuning step
GOAL_CACHE_STEP = 0.80      # KD-from-cache step / online-teacher step
GOAL_CACHE_PPL = 1.02       # ppl from cache / ppl with online teacher
GOAL_COMPRESSION = 0.57     # docs/ARCHITECTURE.md, "What good means" (compressed sparse linears / fp16 dense)
COMPRESSION_LIMIT = 0.5625  # 16-bit values + 2-bit positions, 2:4


# ============================================================================ small helpers

@dataclass
class Verdict:
    """One goal checked against a number: ``met`` is None when the number is missing."""
    goal: str
    measured: str
    met: bool | None

    @property
    def word(self) -> str:
        return "not measured" if self.met is None else ("met" if self.met else "missed")

    def line(self) -> str:
        if self.met is None:
            return f"- **Goal: {self.goal} — not measured yet** ({self.measured})"
        return f"- **Goal: {self.goal} — {self.word}** (measured: {self.measured})"


@dataclass
class Body:
    """A rendered section body and the verdicts it computed."""
    text: str
    verdicts: list[Verdict] = field(default_factory=list)


def at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None or not math.isfinite(value) else value <= limit + 1e-12


def fmt(v: Any, spec: str = ".2f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, spec)


def stamp_line(data: dict, path: Path | None = None) -> str:
    """"Measured <date> on <machine> ..." from the results' stamp; the file's time when there is none."""
    s = data.get("stamp") if isinstance(data, dict) else None
    if isinstance(s, dict) and s.get("date"):
        extra = ", ".join(x for x in (s.get("machine"), s.get("commit") and f"commit {s['commit']}",
                                      s.get("torch") and f"torch {s['torch']}",
                                      s.get("threads") and f"{s['threads']} thread{'s' * (s['threads'] != 1)}")
                          if x)
        return f"Measured {s['date']}" + (f" ({extra})" if extra else "") + "."
    if path is not None and path.exists():
        when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"Date: not recorded (the file has no stamp); file modified {when}, a time a checkout also sets, "
                "so not necessarily when it was measured.")
    return "Date: not recorded."


def default_image(directory: Path, relative_to: Path) -> Callable[[str, str], str]:
    """A function ``(file name, alt text) -> markdown image``, or "" when the PNG is not there."""
    def image(name: str, alt: str) -> str:
        p = directory / name
        if not p.exists():
            return ""
        return f"![{alt}]({Path(os.path.relpath(p, relative_to)).as_posix()})\n"
    return image


def _heading(level: int, text: str) -> str:
    return "#" * level + " " + text + "\n"


# ============================================================================ method ladder

LADDER_ORDER = ("ast-boosted", "ast-naive", "naive", "oneshot-sparsegpt")


def render_ladder(d: dict, image: Callable[[str, str], str]) -> Body:
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
    lines += [table(head, body),
              "gap closed = (ppl_SparseGPT − ppl) / (ppl_SparseGPT − ppl_dense): 0 is one-shot SparseGPT, 100% the "
              "dense model. `ast-ste` is AST-Naive with λ_max = 0 (STE + mask refresh, no decay).", ""]
    lines += [image("ladder.png", "WikiText-2 perplexity per method"),
              image("ladder_curve.png", "validation perplexity vs training tokens")]
    ppl = {r["method"]: r["ppl"] for r in rows}
    present = [m for m in LADDER_ORDER if ppl.get(m) is not None]
    chain = " < ".join(f"{m} {ppl[m]:.2f}" for m in present)
    met = all(ppl[a] < ppl[b_] for a, b_ in zip(present, present[1:])) if len(present) >= 2 else None
    verdicts = [Verdict("perplexity AST-Boosted < AST-Naive < naive retraining < SparseGPT one-shot (DESIGN §5)",
                        chain.replace(" < ", ", ") if present else "no rows", met)]
    return Body("\n".join(lines), verdicts)


# ============================================================================ decay sweep

def _first_last(series: list, spec: str) -> str:
    vals = [v for _, v in series if v is not None]
    return f"{format(vals[0], spec)} → {format(vals[-1], spec)}" if vals else "—"


def render_sweep(d: dict, image: Callable[[str, str], str]) -> Body:
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
    lines.append(table(["λ_max", "T0 steps", "WikiText-2 ppl", "vs λ = 0", "final flip rate",
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


# ============================================================================ step overhead

def step_overhead_command(d: dict) -> str:
    return ("python -m bench.step_overhead" + f" --steps {d['measured_steps']} --warmup {d['warmup_steps']}"
            f" --batch {d['batch']} --seq-len {d['seq_len']} --refresh-every {d['refresh_every']}"
            f" --lambda-max {d['lambda']:g}" + (f" --threads {d['env']['threads']}" if d.get("env") else ""))


def render_step_overhead(d: dict, image: Callable[[str, str], str]) -> Body:
    p, a = d["plain"], d["ast"]
    ms = lambda x: fmt(1000 * x, ".1f") if x is not None else "—"  # noqa: E731
    rows = [["step (median)", ms(p["step"]["median_s"]), ms(a["step"]["median_s"]), fmt(d["ratio_median"], ".3f")],
            ["step (mean, carries the amortised refresh)", ms(p["step"]["mean_s"]), ms(a["step"]["mean_s"]),
             fmt(d["ratio_mean"], ".3f")],
            ["forward + backward (median)", ms(p["fwd_bwd"]["median_s"]), ms(a["fwd_bwd"]["median_s"]),
             fmt(a["fwd_bwd"]["median_s"] / p["fwd_bwd"]["median_s"], ".3f")],
            ["optimizer step (median)", ms(p["opt"]["median_s"]), ms(a["opt"]["median_s"]),
             fmt(a["opt"]["median_s"] / p["opt"]["median_s"], ".3f")]]
    lines = [f"SmolLM2-135M (`{d.get('model')}`), 2:4 magnitude masks, batch {d['batch']} × {d['seq_len']} tokens, "
             f"{d['measured_steps']} measured steps each (after {d['warmup_steps']} warm-up), plain and AST steps "
             f"interleaved (order alternating); AST: λ = {d['lambda']:g} on every masked weight, mask refresh every "
             f"{d['refresh_every']} steps. Plain: `{d.get('env', {}).get('plain_optimizer', 'torch AdamW')}`.", "",
             table(["", "plain ms", "AST ms", "AST / plain"], rows)]
    ref = d.get("refresh", {})
    if ref.get("count_measured"):
        lines += [f"Mask refresh: {fmt(1000 * ref['mean_s'], '.0f')} ms mean over {ref['count_measured']} refreshes "
                  f"(one every {d['refresh_every']} steps).", ""]
    bd = d.get("optimizer_breakdown_median_s")
    if bd:
        lines += ["Optimizer step alone (same gradients, interleaved, median): "
                  + ", ".join(f"{k} {fmt(1000 * v, '.0f')} ms" for k, v in bd.items()) + ".", ""]
    lines += [table(["ratio", "value"], [
        ["AST / plain, median step", fmt(d["ratio_median"], ".3f")],
        ["AST / plain, mean step", fmt(d["ratio_mean"], ".3f")],
        ["from the parts (extra optimizer time + amortised refresh)", fmt(d.get("ratio_from_parts"), ".3f")],
        ["decay + refresh alone (vs ASTAdamW at λ = 0)", fmt(d.get("ratio_decay_and_refresh_only"), ".3f")]])]
    lines.append(image("step_overhead.png", "AST vs plain step time"))
    worst = max(d["ratio_median"], d["ratio_mean"])
    v = Verdict(f"AST step ≤ {GOAL_STEP_OVERHEAD:g}× plain masked fine-tuning step",
                f"{worst:.3f}, the larger of the median and mean ratios", at_most(worst, GOAL_STEP_OVERHEAD))
    return Body("\n".join(lines), [v])


# ============================================================================ teacher-cache formats

def _cache_static(s: dict) -> str:
    rows = []
    for r in s["rows"]:
        rows.append([r["name"], fmt(r["bytes_per_token"], ".0f"), fmt(r["bias"], ".3f"), fmt(r["single_draw"], ".3f"),
                     fmt(r.get("noise_floor"), ".3f"), fmt(r.get("bias_batch"), ".3f"),
                     fmt(r.get("single_draw_batch"), ".3f")])
    return "\n".join([
        f"Gradient error on real logits: teacher `{s['model']}` dense, student the same model pruned 2:4 by "
        f"magnitude; {s['blocks']} C4 blocks × {s['seq_len']} tokens; T = {s['temperature']:g}; sampled formats "
        f"over {s['seeds']} independent draws; head+sampled = {s['head_sampled']}.", "",
        table(["format", "bytes/token", "bias", "single draw", "√-floor", "bias (batch)", "single (batch)"], rows),
        "Errors are ‖∇L_cache − ∇KL_full‖ / ‖∇KL_full‖ on the student logits, per token then averaged "
        "(\"batch\": one ratio over all tokens, what the summed batch gradient sees). bias = error of the mean "
        "gradient over the draws (for top-k, deterministic, the whole error); single draw = mean error of one "
        "draw; √-floor = single/√draws, what the bias column shows for an unbiased format (remaining variance).",
        "", *_unbiased_line(s["rows"]),
        f"Full-vocabulary fp16 logits would be {2 * s.get('vocab', 0):,} bytes per token.", ""])


def _unbiased_line(rows: list[dict]) -> list[str]:
    """Which sampled formats show no bias beyond the remaining variance of the mean over the draws."""
    sampled = [r for r in rows if r.get("noise_floor")]
    if not sampled:
        return []
    clean = [r["name"] for r in sampled if r["bias"] <= 1.1 * r["noise_floor"]]
    other = [r["name"] for r in sampled if r["bias"] > 1.1 * r["noise_floor"]]
    out = ("No bias detectable beyond the remaining variance (bias ≤ 1.1 × √-floor) for: "
           + (", ".join(clean) or "none"))
    return [out + (f"; above it for: {', '.join(other)}." if other else "."), ""]


CACHE_GOALS = (f"KD-from-cache step ≤ {GOAL_CACHE_STEP:.2f}× online-teacher step",
               f"perplexity from the cache within {round(100 * (GOAL_CACHE_PPL - 1), 6):g}% of the online teacher's")


def _cache_train(t: dict) -> tuple[str, list[Verdict]]:
    rows = []
    for r in t["rows"]:
        rows.append([r["name"], fmt(r["ppl"]), fmt(r.get("ppl_ratio"), ".4f"), fmt(r.get("bytes_per_token"), ".0f"),
                     fmt(r.get("step_s"), ".2f"), fmt(r.get("step_ratio"), ".3f")])
    text = "\n".join([
        f"Training from each cache: `{t['params']}`, {t['method']}, {t['steps']} steps × {t['batch']}×{t['seq_len']} "
        f"tokens = {t['tokens']:,} tokens per variant (same blocks, same seed); WikiText-2 perplexity over "
        f"{t.get('eval_windows')} windows × {t.get('eval_seq_len')} tokens. Step time: median over steps (first "
        f"{t.get('skip_steps', 2)} skipped) of the training log's tokens/s, measured in this one run; the variants "
        f"ran one after another.", "",
        table(["variant", "WikiText-2 ppl", "ppl / online", "cache bytes/token", "step s", "step / online"], rows)])
    cached = [r for r in t["rows"] if r["name"] != "online"]
    # The goals are about the cache the preset trains from (the one variant sharing the base run's
    # cache); the other formats are the comparison that chose it. Without one, every format must meet them.
    preset = next((r["name"] for r in cached if r.get("shared_cache")), None)
    verdicts = []
    for key, goal, what in (("step_ratio", GOAL_CACHE_STEP, CACHE_GOALS[0]), ("ppl_ratio", GOAL_CACHE_PPL,
                                                                            CACHE_GOALS[1])):
        vals = {r["name"]: r.get(key) for r in cached}
        ok = [n for n, v in vals.items() if at_most(v, goal)]
        bad = [n for n, v in vals.items() if at_most(v, goal) is False]
        measured = "; ".join(f"{n} {fmt(v, '.3f')}" for n, v in vals.items())
        summary = (f"met by {', '.join(ok) or 'none'}" + (f"; missed by {', '.join(bad)}" if bad else ""))
        if preset is not None:
            met = at_most(vals[preset], goal)
            summary = f"judged on the preset's format, {preset}; {summary}"
        else:
            met = None if not (ok or bad) else not bad
        verdicts.append(Verdict(what, f"{measured} — {summary}", met))
    return text, verdicts


def _provenance(part: dict, default: str) -> str:
    return f"Command: `{part.get('command') or default}` — {stamp_line(part)}\n"


def render_cache_formats(d: dict, image: Callable[[str, str], str] | None = None) -> Body:
    """Both parts of cache_formats.json, each with its own command and stamp (they run separately)."""
    lines, verdicts = [], []
    for key, title in (("static", "Bytes per token and gradient error"), ("train", "Training from the cache")):
        part = d.get(key)
        if not part:
            run = f"python -m bench.cache_formats --part {key}"
            lines += [f"**{title}**: not measured yet (run: `{run}`).", ""]
            if key == "train":
                verdicts = [Verdict(g, f"run: `{run}`", None) for g in CACHE_GOALS]
            continue
        lines += [f"**{title}.** " + _provenance(part, f"python -m bench.cache_formats --part {key}")]
        if key == "static":
            lines.append(_cache_static(part))
        else:
            text, verdicts = _cache_train(part)
            lines.append(text)
    if not (d.get("static") or d.get("train")):
        raise KeyError("neither a 'static' nor a 'train' part")
    if image is not None:
        lines.append(image("cache_formats.png", "perplexity and bytes per token per cache format"))
    return Body("\n".join(lines), verdicts)


def render_cache_formats_md(d: dict, directory: Path, level: int = 1) -> str:
    """cache_formats.md (written by bench/cache_formats.py next to its PNG)."""
    b = render_cache_formats(d, default_image(directory, directory))
    return "\n".join([_heading(level, "Teacher-cache formats"), b.text.rstrip(), "",
                      *[v.line() for v in b.verdicts], ""])


# ============================================================================ SLoRB init

def render_slorb_init(d: dict, image: Callable[[str, str], str]) -> Body:
    """SLoRB init: AST-Naive (no SLoRB), AST-Boosted with the paper's mean init and with least squares."""
    b, e = d["budget"], d["evaluation"]
    rows = [[r["label"], fmt(r.get("val_ppl_start"), ".1f"), fmt(r.get("val_ppl_end"), ".1f"), fmt(r.get("ppl"))]
            for r in d["rows"]]
    lines = [f"Model `{d['model']}`, params `{d['params']}`, SLoRB group {d['slorb_group']}. Budget per run: "
             f"{b['steps']} steps × {b['batch']}×{b['seq_len']} tokens = {b['tokens']:,} tokens (same blocks, "
             f"order, teacher cache and seed). Validation: {e['val_blocks']}×{e['val_seq_len']} held-out C4 tokens, "
             f"step 0 = after the initial mask (and SLoRB init), before any training step. WikiText-2 test over "
             f"{e['wikitext2_windows']} windows × {e['seq_len']} tokens after training.", "",
             table(["run", "val ppl at step 0", "val ppl at the end", "WikiText-2 ppl"], rows),
             image("slorb_init.png", "validation perplexity vs tokens per SLoRB init")]
    return Body("\n".join(lines), [])


def render_slorb_init_md(d: dict, directory: Path, level: int = 1) -> str:
    """slorb_init.md (written by bench/slorb_init.py next to its PNG)."""
    b = render_slorb_init(d, default_image(directory, directory))
    return "\n".join([_heading(level, "SLoRB initialisation"), stamp_line(d), "", f"Command: `{d['command']}`", "",
                      b.text.rstrip(), ""])


# ============================================================================ compression

def render_compression_body(d: dict, image: Callable[[str, str], str] | None = None) -> Body:
    mib = lambda b: f"{b / 2 ** 20:,.2f} MiB"  # noqa: E731
    other = d["checkpoint_compressed_bytes"] - d["sparse_linear_compressed_bytes"] - d["slorb_bytes"]
    rows = [
        ["sparse linears (values + 2-bit positions) / fp16 dense", mib(d["sparse_linear_compressed_bytes"]),
         mib(d["sparse_linear_dense_bytes"]), fmt(d["sparse_linear_ratio"], ".4f")],
        ["whole checkpoint incl. SLoRB / dense model fp16 (no SLoRB)", mib(d["checkpoint_compressed_bytes"]),
         mib(d["dense_model_bytes"]), fmt(d["checkpoint_ratio_vs_dense_model"], ".4f")],
        ["whole checkpoint incl. SLoRB / the same tensors dense", mib(d["checkpoint_compressed_bytes"]),
         mib(d["checkpoint_dense_bytes_with_slorb"]), fmt(d["checkpoint_ratio_same_tensors"], ".4f")],
        ["compressed file / HF export weights file (fp16, zeros)", mib(d["compressed_file_bytes"]),
         mib(d["hf_weights_file_bytes"]), fmt(d["file_ratio_vs_hf_weights"], ".4f")],
    ]
    text = "\n".join([
        f"`{d['model']}` in {d['dtype']}, {d['sparse_linears']} sparse linears with {d['pattern']} {d['masks']} masks "
        f"and SLoRB (group {d['slorb_group']}: {d['slorb_params']:,} parameters, {mib(d['slorb_bytes'])}); both "
        "exports written to a temporary directory and counted.", "",
        table(["what", "compressed", "reference", "ratio"], rows),
        f"Physical limit for 2:4 with 16-bit values and 2-bit positions: {COMPRESSION_LIMIT}. The embeddings "
        "(tied with the LM head), norms and SLoRB stay dense, so the whole checkpoint cannot reach that limit. "
        f"Kept dense in the compressed checkpoint: {mib(other)} (embeddings, norms) + {mib(d['slorb_bytes'])} SLoRB. "
        f"The HF export directory holds {mib(d['hf_dir_bytes'])}: weights {mib(d['hf_weights_file_bytes'])}, SLoRB "
        f"PEFT adapter {mib(d['hf_slorb_file_bytes'])} (SLoRB does not fold into a 2:4 weight; the adapter "
        "stores lora_A = X beside lora_B = S), the packed masks and "
        "JSON (written without a tokenizer).", ""])
    if image is not None:
        text += image("compression.png", "compression")
    r = d["sparse_linear_ratio"]
    v = Verdict(f"compressed 2:4 sparse linears ≤ {GOAL_COMPRESSION:g}× fp16 dense bytes (physical limit "
                f"{COMPRESSION_LIMIT})", f"{r:.4f}; whole checkpoint incl. SLoRB "
                f"{d['checkpoint_ratio_vs_dense_model']:.4f} of the dense model", at_most(r, GOAL_COMPRESSION))
    return Body(text, [v])


def render_compression(d: dict, level: int = 1) -> str:
    """compression.md (written by bench/compression.py)."""
    b = render_compression_body(d)
    return "\n".join([_heading(level, "Compressed 2:4 export vs fp16 dense"), stamp_line(d), "",
                      f"Command: `{d.get('command', 'python -m bench.compression')}`", "", b.text,
                      *[v.line() for v in b.verdicts], ""])


# ============================================================================ GPU kernels

def _big(k: dict) -> bool:
    return max(k["out"], k["in"]) >= 4096


def render_gpu_kernels(d: dict, image: Callable[[str, str], str]) -> Body:
    ks = d["kernels"]
    sp = lambda x: "—" if x is None else (f"{x:.2f}×" + (" (slower)" if x < 1 else ""))  # noqa: E731
    rows = [[f"{k['out']} × {k['in']}", str(k["tokens"]), fmt(k["dense_ms"], ".4f"), fmt(k["sparse_ms"], ".4f"),
             sp(k.get("speedup")), fmt(k.get("dense_graph_ms"), ".4f"), fmt(k.get("sparse_graph_ms"), ".4f"),
             sp(k.get("graph_speedup")), fmt(k.get("rel_err"), ".1e")] for k in ks]
    lines = ["Run on a CUDA machine (lent through the `device` tool); `make bench` does not re-run it.", "",
             f"{d.get('device', 'GPU')}, torch {d.get('torch')}, CUDA {d.get('cuda')}, backend {d.get('backend')}, "
             f"bf16, CUDA-event medians of {d.get('iters')} runs. Eager times include the per-call host work "
             "(dispatch, cuSPARSELt plan set-up); CUDA-graph times replay a captured graph: the kernels alone.", "",
             table(["out × in", "tokens", "dense ms", "2:4 ms", "speed-up", "dense ms (graph)", "2:4 ms (graph)",
                    "speed-up (graph)", "rel err"], rows)]
    # where 2:4 wins: per shape, the token counts with a speed-up > 1
    lines.append("Where 2:4 wins (speed-up > 1):\n")
    shapes: dict[tuple[int, int], list[dict]] = {}
    for k in ks:
        shapes.setdefault((k["out"], k["in"]), []).append(k)
    for (o, i), group in shapes.items():
        eager = [str(k["tokens"]) for k in group if (k.get("speedup") or 0) > 1]
        graph = [str(k["tokens"]) for k in group if (k.get("graph_speedup") or 0) > 1]
        lines.append(f"- {o} × {i}: eager " + (f"at {', '.join(eager)} tokens" if eager else "never")
                     + "; CUDA graph " + (f"at {', '.join(graph)} tokens" if graph else "never"))
    lines.append("")
    e2e = d.get("end_to_end")
    if e2e and e2e.get("rows"):
        model = str(e2e.get("model")).split(" ('")[0]  # the file adds why the real weights were not loaded
        lines += [f"End-to-end forward, {model}: {e2e.get('converted_layers')} layers on 2:4 kernels; "
                  "logits vs dense-with-zeros max abs diff "
                  f"{fmt((e2e.get('logit_diff') or {}).get('max_abs'), '.3g')}.",
                  "", table(["batch × seq", "dense ms", "2:4 ms", "speed-up", "dense ms (graph)", "2:4 ms (graph)",
                             "speed-up (graph)"],
                            [[f"{r['batch']} × {r['seq_len']}", fmt(r["dense_ms"], ".3f"), fmt(r["sparse_ms"], ".3f"),
                              sp(r.get("speedup")), fmt(r.get("dense_graph_ms"), ".3f"),
                              fmt(r.get("sparse_graph_ms"), ".3f"), sp(r.get("graph_speedup"))]
                             for r in e2e["rows"]])]
    lines.append(image("gpu_kernels.png", "2:4 speed-up per shape and token count"))
    verdicts = []
    top = max(k["tokens"] for k in ks)
    for label, pick in (("LLaMA-7B-size linears (a dimension ≥ 4096)", _big),
                        ("SmolLM2-size linears", lambda k: not _big(k))):
        at_top = [k for k in ks if pick(k) and k["tokens"] == top]
        if not at_top:
            continue
        wins = [k for k in at_top if (k.get("graph_speedup") or 0) > 1]
        measured = "; ".join(f"{k['out']}×{k['in']} {sp(k.get('graph_speedup'))}" for k in at_top)
        verdicts.append(Verdict(f"2:4 faster than dense at large batch ({top} tokens, CUDA graph) for {label}",
                                measured, len(wins) == len(at_top)))
    return Body("\n".join(lines), verdicts)


# ============================================================================ the report

@dataclass(frozen=True)
class Section:
    key: str          # results file stem and notes file name
    title: str
    command: str      # what produces it (used when the file does not say)
    render: Callable[[dict, Callable[[str, str], str]], Body]
    command_of: Callable[[dict], str] | None = None
    own_provenance: bool = False  # the body prints its parts' commands and stamps itself


def render_fair_ladder(d: dict, image: Callable[[str, str], str]) -> Body:
    from bench.fair_ladder import render_body
    return Body(render_body(d, image))


def render_train_throughput(d: dict, image: Callable[[str, str], str]) -> Body:
    from bench.train_throughput import render_body
    return Body(render_body(d))


SECTIONS = [
    Section("fair_ladder", "Fair method ladder: adaptive vs fixed mask with the same distillation",
            "python -m bench.fair_ladder", render_fair_ladder, own_provenance=True),
    Section("train_throughput", "Training throughput: tokens/s and the share of a GEMM's FLOP/s",
            "python -m bench.train_throughput", render_train_throughput, own_provenance=True),
    Section("ladder", "Method ladder (quality at one token budget)", "python -m bench.ladder", render_ladder),
    Section("sweep", "Decay sweep (λ_max × T0 at the bench budget)", "python -m bench.decay_sweep", render_sweep),
    Section("step_overhead", "Overhead: AST step vs plain masked fine-tuning step", "python -m bench.step_overhead",
            render_step_overhead, step_overhead_command),
    Section("cache_formats", "Teacher cache: formats, gradient error, training from the cache",
            "python -m bench.cache_formats --part all", render_cache_formats, own_provenance=True),
    Section("slorb_init", "SLoRB initialisation: the paper's mean vs least squares", "python -m bench.slorb_init",
            render_slorb_init),
    Section("compression", "Compression: 2:4 export vs fp16 dense", "python -m bench.compression",
            render_compression_body),
    Section("gpu_kernels", "GPU kernels: 2:4 (cuSPARSELt) vs dense", "python -m bench.gpu_kernels",
            render_gpu_kernels, lambda d: f"python -m bench.gpu_kernels --iters {d['iters']}"),
]

HEADER = """<!-- GENERATED FILE: do not edit by hand. Built by `make bench-report` (this report only)
     or `make bench` (every CPU benchmark, then this report) from bench/results/*.json;
     explanations come from bench/notes/<section>.md. -->
# Benchmark results

Generated by `make bench-report` (`python -m bench.report`) from the JSON files in `bench/results/`;
`make bench` re-runs every CPU benchmark first. **Do not edit this file by hand**: change a benchmark
or the hand-written notes in `bench/notes/<section>.md` and regenerate.
"""


def _note(notes: Path, key: str) -> str | None:
    p = notes / f"{key}.md"
    if p.exists():
        text = p.read_text(encoding="utf-8").strip()
        return text or None
    return None


def _load(path: Path) -> tuple[dict | None, str | None]:
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, f"{path.name} could not be read ({type(err).__name__}: {err})"
    if not isinstance(data, dict):
        return None, f"{path.name} holds a {type(data).__name__}, not an object"
    return data, None


def render_section(sec: Section, results: Path, out: Path, notes: Path) -> tuple[str, list[Verdict]]:
    """One section of RESULTS.md and its verdicts ("not measured yet" when the file is missing or unreadable)."""
    path = results / f"{sec.key}.json"
    data, problem = _load(path)
    lines = [_heading(2, sec.title)]
    body = None
    if data is not None:
        try:
            body = sec.render(data, default_image(results, out.parent))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as err:
            problem = f"{path.name} has an unexpected shape ({type(err).__name__}: {err})"
    if body is None:
        why = f" — {problem}" if problem else ""
        lines += [f"Not measured yet (run: `{sec.command}`){why}.", ""]
        verdicts: list[Verdict] = []
    else:
        if not sec.own_provenance:
            command = data.get("command") or (sec.command_of(data) if sec.command_of else None) or sec.command
            lines += [f"Command: `{command}`", "", stamp_line(data, path), ""]
        lines += [body.text.rstrip(), ""]
        verdicts = body.verdicts
        lines += [v.line() for v in verdicts]
        if verdicts:
            lines.append("")
    note = _note(notes, sec.key)
    if note:
        lines += [note, ""]
    elif any(v.met is False for v in verdicts):
        lines += [f"_Why the goal was missed: not written yet (add `bench/notes/{sec.key}.md`)._", ""]
    return "\n".join(lines), verdicts


def build_report(results: Path = RESULTS, out: Path = OUT, notes: Path = NOTES) -> str:
    parts, summary = [], []
    for sec in SECTIONS:
        text, verdicts = render_section(sec, results, out, notes)
        parts.append(text)
        summary += [(sec, v) for v in verdicts]
    glance = [_heading(2, "Goals at a glance")]
    if summary:
        glance.append(table(["goal", "verdict", "measured", "section"],
                            [[v.goal, f"**{v.word}**", v.measured, sec.title] for sec, v in summary], "llll"))
    else:
        glance.append("No goal measured yet.\n")
    missing = [sec for sec in SECTIONS if not (results / f"{sec.key}.json").exists()]
    if missing:
        glance.append("Not measured yet: " + ", ".join(f"{s.title} (`{s.command}`)" for s in missing) + ".\n")
    return "\n".join([HEADER, *glance, *parts]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--notes", type=Path, default=NOTES)
    args = ap.parse_args(argv)
    text = build_report(args.results.resolve(), args.out.resolve(), args.notes.resolve())
    from ast_core.atomic import atomic_write_text
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
