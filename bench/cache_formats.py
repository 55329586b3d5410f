"""Teacher-cache formats: bytes per token, gradient error, and training from each (issue #6, item 2).

Two parts (``--part static|train|all``):

**static** (minutes, real model, no training): a few C4 blocks through the
dense SmolLM2-135M (teacher) and the same model pruned 2:4 by magnitude
(student). For every cache format — top-k at k ∈ {32, 64, 256}, sampled with
64 and 256 draws, and head+sampled (the exact top-32 head + 64 draws from the
renormalised tail) — the bytes per token of the stored targets and the
relative error of the logit gradient against full-vocabulary KD at T = 2
(per token: ‖∇L_cache − ∇KL_full‖ / ‖∇KL_full‖ over the V logits, averaged over
tokens; :func:`ast_core.distill.logit_grad_error`). Sampled formats are
measured over ``--seeds`` independent draws: the *single-draw* error (mean over
draws of each draw's error) and the *bias* (error of the mean gradient over all
draws; for an unbiased format it falls like single/√seeds — that floor is
reported beside it). Top-k is deterministic: its bias is its whole error.

**train** (the number that decides the default): through :mod:`bench.runner`,
AST-Naive on one prepared C4 sample with the same token budget and seed, once
with the dense teacher run online (``teacher_cache.enabled=false``) and once
from each cache format. Reports WikiText-2 perplexity (and its ratio to the
online run; goal ≤ 1.02), cache bytes per token, and the median step time
(``tokens_per_s`` of the training log, first 2 steps skipped) as "cache step
time / online step time" (goal ≤ 0.80). The variants run one after another in
this one process, so machine load hits them alike only on average.

Writes ``cache_formats.json`` (sections ``static`` and ``train``; a run of one
part keeps the other's last result), ``cache_formats.md`` and
``cache_formats.png`` under ``--out-dir`` (default ``bench/results``).

    python -m bench.cache_formats --part static [--blocks 4] [--seeds 32]
    python -m bench.cache_formats --part train [--params params/smollm2-quick.yaml] [--steps 40]
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from bench.runner import RESULTS, STAGES, WORK, Variant, stamp, write_json  # noqa: E402
from bench.report import Body, Verdict, at_most, default_image, fmt, heading, stamp_line  # noqa: E402
from tasks.tables import markdown_table  # noqa: E402

TEMPERATURE = 2.0
MODEL = "embedded:smollm2-135m"
HEAD_K, HEAD_SAMPLES = 32, 64  # head+sampled: exact top-32 head + 64 draws from the tail
SKIP_STEPS = 2  # first steps carry one-off costs (allocation, page-in of the cache)


@dataclass(frozen=True)
class CacheFormat:
    """One cache format: ``fmt`` as in :data:`ast_core.distill.FORMATS`, with its size knobs."""
    name: str
    fmt: str
    k: int = 0
    samples: int = 0

    @property
    def sampled(self) -> bool:
        return self.fmt in ("sampled", "head+sampled")

    def overrides(self) -> list[str]:
        """``--set`` overrides selecting this format for the cache-teacher stage."""
        out = ["teacher_cache.enabled=true", f"teacher_cache.format={self.fmt}"]
        if self.k:
            out.append(f"teacher_cache.k={self.k}")
        if self.samples:
            out.append(f"teacher_cache.samples={self.samples}")
        return out

    def expected_bytes_per_token(self) -> int:
        """Storage formula of :mod:`ast_core.distill`: 6 bytes per stored (value, id) pair + per-token scalars."""
        if self.fmt == "topk":
            return 6 * self.k + 4  # fp16 logp + int32 idx, float32 rest
        if self.fmt == "sampled":
            return 6 * self.samples + 4  # int32 id + int16 count, float32 entropy
        return 6 * self.k + 6 * self.samples + 8  # head + draws + tail_mass + entropy


FORMATS = [
    CacheFormat("topk-32", "topk", k=32),
    CacheFormat("topk-64", "topk", k=64),
    CacheFormat("topk-256", "topk", k=256),
    CacheFormat("sampled-64", "sampled", samples=64),
    CacheFormat("sampled-256", "sampled", samples=256),
    CacheFormat(f"head{HEAD_K}+sampled{HEAD_SAMPLES}", "head+sampled", k=HEAD_K, samples=HEAD_SAMPLES),
]


def command_line(argv: list[str]) -> str:
    return "python " + shlex.join(["-m", "bench.cache_formats", *argv])


# ============================================================================ static part

def _cache_grad(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], fmt: str,
                temperature: float) -> torch.Tensor:
    from ast_core.distill import kl_from_targets
    s = student_logits.detach().float().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_from_targets(s, targets, fmt, temperature), s)
    return g


def _full_grad(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    from ast_core.distill import kl_full
    s = student_logits.detach().float().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_full(s, teacher_logits, temperature), s)
    return g


def _rel_errors(g: torch.Tensor, g_full: torch.Tensor, full_norm_tok: torch.Tensor,
                full_norm: float) -> tuple[float, float]:
    """(per-token relative error averaged over tokens, one relative error over the whole batch)."""
    diff = (g - g_full).double()
    per_tok = torch.linalg.vector_norm(diff, dim=-1) / full_norm_tok
    return float(per_tok.mean()), float(torch.linalg.vector_norm(diff) / full_norm)


def static_errors(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  formats: list[CacheFormat] = FORMATS, seeds: int = 32,
                  temperature: float = TEMPERATURE) -> list[dict]:
    """Bytes per token and logit-gradient errors of every format against full-vocabulary KD.

    Per format: ``bytes_per_token`` (of the targets actually built), ``bias``
    (per-token relative error of the mean gradient over ``seeds`` draws; for
    top-k, its deterministic error), ``single_draw`` (mean over draws of each
    draw's per-token error; equal to ``bias`` for top-k), the same two as one
    ratio over the whole batch (``*_batch``), and for sampled formats
    ``noise_floor`` = single/√seeds, what the mean-of-draws error of an
    unbiased estimator is expected to be.
    """
    from ast_core.distill import make_targets, target_bytes_per_token
    teacher_logits, student_logits = teacher_logits.float(), student_logits.float()
    g_full = _full_grad(student_logits, teacher_logits, temperature)
    full_norm_tok = torch.linalg.vector_norm(g_full.double(), dim=-1).clamp_min(1e-300)
    full_norm = float(torch.linalg.vector_norm(g_full.double()).clamp_min(1e-300))
    rows = []
    for f in formats:
        t0 = time.perf_counter()
        draws = seeds if f.sampled else 1
        g_sum = torch.zeros_like(g_full)
        single, single_batch, nbytes = [], [], []
        for seed in range(draws):
            targets = make_targets(teacher_logits, f.fmt, k=f.k or 64, samples=f.samples or 256,
                                   temperature=temperature, generator=torch.Generator().manual_seed(seed))
            nbytes.append(target_bytes_per_token(targets))
            g = _cache_grad(student_logits, targets, f.fmt, temperature)
            tok_err, batch_err = _rel_errors(g, g_full, full_norm_tok, full_norm)
            single.append(tok_err)
            single_batch.append(batch_err)
            g_sum += g
            del targets, g
        bias, bias_batch = _rel_errors(g_sum / draws, g_full, full_norm_tok, full_norm)
        row = {**asdict(f), "bytes_per_token": statistics.fmean(nbytes),
               "expected_bytes_per_token": f.expected_bytes_per_token(), "draws": draws,
               "bias": bias, "single_draw": statistics.fmean(single),
               "bias_batch": bias_batch, "single_draw_batch": statistics.fmean(single_batch),
               "seconds": time.perf_counter() - t0}
        if f.sampled:
            row["noise_floor"] = row["single_draw"] / math.sqrt(draws)
        rows.append(row)
    return rows


def c4_blocks(tokenizer, n_blocks: int, seq_len: int):  # type: ignore[no-untyped-def]
    """The first ``n_blocks`` token blocks of the C4 sample (the data the pipeline trains on)."""
    from ast_core.data import load_texts, tokenize_blocks
    docs = 4 * n_blocks
    while True:
        blocks = tokenize_blocks(load_texts("c4", "train", max_docs=docs), tokenizer, seq_len)
        if len(blocks) >= n_blocks or docs >= 1000:
            break
        docs *= 2
    if len(blocks) < n_blocks:
        raise SystemExit(f"the C4 sample holds {len(blocks)} blocks of {seq_len} tokens, need {n_blocks}")
    return torch.from_numpy(blocks[:n_blocks].astype("int64"))


def real_logits(model_spec: str, n_blocks: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) logits on C4 blocks: dense model vs the same model pruned 2:4 by magnitude."""
    import copy

    from ast_core.models import load_model, load_tokenizer
    from ast_core.oneshot import oneshot_prune
    from ast_core.sparse import sparsify
    ids = c4_blocks(load_tokenizer(model_spec), n_blocks, seq_len)
    teacher = load_model(model_spec)
    student = copy.deepcopy(teacher)
    sparsify(student)
    oneshot_prune(student, "magnitude")
    with torch.no_grad():
        t = teacher(ids).logits.float()
        del teacher
        s = student(ids).logits.float()
    return t, s


def run_static(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    teacher, student = real_logits(args.model, args.blocks, args.seq_len)
    rows = static_errors(teacher, student, FORMATS, seeds=args.seeds, temperature=TEMPERATURE)
    return {"stamp": stamp(), "command": args.command, "model": args.model,
            "student": "the same model, one-shot 2:4 magnitude pruning", "data": "c4 (mirror sample)",
            "blocks": args.blocks, "seq_len": args.seq_len, "tokens": args.blocks * args.seq_len,
            "temperature": TEMPERATURE, "seeds": args.seeds, "vocab": int(teacher.shape[-1]),
            "head_sampled": f"exact top-{HEAD_K} head + {HEAD_SAMPLES} draws from the renormalised tail",
            "error_measure": "per-token relative L2 error of the logit gradient vs full-vocabulary KD, "
                             "averaged over tokens (*_batch: one ratio over all tokens)",
            "rows": rows, "wall_s": time.perf_counter() - start}


# ============================================================================ train part

def base_overrides(steps: int, batch: int, warmup: int) -> list[str]:
    """The shared budget: AST-Naive, ``steps`` steps, one epoch over ``steps·batch`` blocks, no zero-shot.

    The preset's warm-up is kept unless it would not fit in ``steps`` (a config error otherwise).
    """
    out = ["train.method=ast-naive", f"train.steps={steps}", f"train.t0_steps={steps // 4}",
           f"data.max_train_blocks={steps * batch}", f"train.checkpoint_every={steps}", "train.eval_every=0",
           "evaluate.max_windows=8", "evaluate.zero_shot.enabled=false"]
    if warmup > steps:
        out.append(f"train.warmup_steps={steps}")
    return out


def train_variants(params: str, base: list[str]) -> list[Variant]:
    """Online teacher + one variant per format; only the format the shared base builds shares its cache."""
    from tasks.config import load_config
    tc = load_config(params, base).teacher_cache

    def same_as_base(f: CacheFormat) -> bool:
        return (tc.enabled and tc.format == f.fmt and (f.fmt == "sampled" or tc.k == f.k)
                and (f.fmt == "topk" or tc.samples == f.samples))

    out = [Variant("online", ["teacher_cache.enabled=false"], share_cache=False)]
    out += [Variant(f.name, f.overrides(), share_cache=same_as_base(f)) for f in FORMATS]
    return out


def select(variants: list[Variant], only: list[str] | None) -> list[Variant]:
    """The formats named in ``only`` (all when empty), always with the online reference:
    every ratio is against it."""
    if not only:
        return variants
    unknown = set(only) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"unknown cache format(s) {sorted(unknown)}; known: {[v.name for v in variants]}")
    return [v for v in variants if v.name == "online" or v.name in only]


def median_step_s(history: list[dict], tokens_per_step: int, skip: int = SKIP_STEPS) -> float | None:
    """Median seconds per training step from the log's ``tokens_per_s`` (the first ``skip`` steps left out)."""
    rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h and h.get("step", 0) > skip]
    if not rates:
        rates = [h["tokens_per_s"] for h in history if "tokens_per_s" in h]
    return statistics.median(tokens_per_step / r for r in rates) if rates else None


def run_train(args: argparse.Namespace) -> dict:
    from bench.runner import run_all
    from tasks.config import load_config
    preset = load_config(args.params).train
    base = base_overrides(args.steps, preset.batch_size * preset.grad_accum, preset.warmup_steps)
    cfg = load_config(args.params, base)
    variants = select(train_variants(args.params, base), args.only)
    root = Path(args.work_dir) if args.work_dir else WORK / "cache_formats" / f"{cfg.name}-{args.steps}steps"
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    start = time.perf_counter()
    results = run_all(args.params, base, variants, root, stages=STAGES)
    by_name = {f.name: f for f in FORMATS}
    rows = []
    for v in variants:
        r = results[v.name]
        f = by_name.get(v.name)
        rows.append({"name": v.name, "format": f.fmt if f else "online", "k": (f.k or None) if f else None,
                     "samples": (f.samples or None) if f else None, "shared_cache": v.share_cache,
                     "ppl": r.metrics.get("ppl_wikitext2"), "ppl_dense": r.metrics.get("ppl_wikitext2_dense"),
                     "bytes_per_token": r.cache.get("bytes_per_token"),
                     "step_s": median_step_s(r.history, tokens_per_step),
                     "steps_timed": sum(1 for h in r.history if "tokens_per_s" in h and h.get("step", 0) > SKIP_STEPS),
                     "tokens_trained": r.metrics.get("tokens_trained"), "wall_s": r.wall_s})
    online = rows[0]
    for row in rows:
        row["ppl_ratio"] = row["ppl"] / online["ppl"] if row["ppl"] and online["ppl"] else None
        row["step_ratio"] = row["step_s"] / online["step_s"] if row["step_s"] and online["step_s"] else None
    return {"stamp": stamp(), "command": args.command, "params": args.params, "method": "ast-naive",
            "steps": args.steps, "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
            "tokens": args.steps * tokens_per_step, "eval_windows": cfg.evaluate.max_windows,
            "eval_seq_len": cfg.evaluate.seq_len, "skip_steps": SKIP_STEPS,
            "head_sampled": f"exact top-{HEAD_K} head + {HEAD_SAMPLES} draws from the renormalised tail",
            "base_overrides": base, "work_dir": str(root), "rows": rows,
            "goals": {"ppl_ratio": 1.02, "step_ratio": 0.80},
            "wall_s": time.perf_counter() - start}


# ============================================================================ outputs

def plot(data: dict, path: Path) -> bool:
    """ppl per format against the online line; bytes per token; gradient errors. False when nothing to draw."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bench import plotting
    train, static = data.get("train"), data.get("static")
    panels = [p for p, ok in (("ppl", train), ("bytes", train or static), ("grad", static)) if ok]
    if not panels:
        return False
    fig = Figure(figsize=(5.2 * len(panels), 4.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        ax.grid(True, axis="y", alpha=0.3)
        if panel == "ppl":
            rows = [r for r in train["rows"] if r["name"] != "online" and r["ppl"]]
            online = next((r["ppl"] for r in train["rows"] if r["name"] == "online"), None)
            ax.bar([r["name"] for r in rows], [r["ppl"] for r in rows], color="C0")
            values = [r["ppl"] for r in rows]
            if online:
                ax.axhline(online, color="k", ls="--", label=f"online teacher {online:.2f}")
                ax.axhline(online * 1.02, color="C3", ls=":", label="online + 2% (goal)")
                ax.legend(fontsize=8)
                values += [online, online * 1.02]
            if values:
                lo, hi = min(values), max(values)
                pad = 0.2 * (hi - lo) + 0.01 * hi
                ax.set_ylim(max(0.0, lo - pad), hi + pad)
            ax.set_ylabel("WikiText-2 perplexity")
            ax.set_title(f"AST-Naive, {train['steps']} steps ({train['tokens']:,} tokens)", fontsize=10)
        elif panel == "bytes":
            rows = [r for r in (train or static)["rows"] if r.get("bytes_per_token")]
            ax.bar([r["name"] for r in rows], [r["bytes_per_token"] for r in rows], color="C2")
            ax.set_ylabel("cache bytes per token")
            ax.set_title("teacher-cache size", fontsize=10)
        else:
            rows = static["rows"]
            x = list(range(len(rows)))
            ax.bar([j - 0.2 for j in x], [r["single_draw"] for r in rows], width=0.4, color="C1",
                   label="single draw")
            ax.bar([j + 0.2 for j in x], [r["bias"] for r in rows], width=0.4, color="C4",
                   label=f"bias (mean of {static['seeds']} draws)")
            ax.set_xticks(x, [r["name"] for r in rows])
            ax.set_ylabel("relative logit-gradient error")
            ax.set_title(f"vs full-vocabulary KD, T = {static['temperature']:g}", fontsize=10)
            ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    plotting.save(fig, path)
    return True


def write_outputs(data: dict, out_dir: Path) -> None:
    from ast_core.atomic import atomic_write_text
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "cache_formats.json", data)
    plot(data, out_dir / "cache_formats.png")
    md = render_markdown(data, out_dir, level=1)
    atomic_write_text(out_dir / "cache_formats.md", md)


# ----------------------------------------------------------------------------- report section

GOAL_CACHE_STEP = 0.80  # KD-from-cache step / online-teacher step
GOAL_CACHE_PPL = 1.02   # ppl from cache / ppl with online teacher


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
        markdown_table(["format", "bytes/token", "bias", "single draw", "√-floor", "bias (batch)", "single (batch)"],
                       rows),
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
        markdown_table(["variant", "WikiText-2 ppl", "ppl / online", "cache bytes/token", "step s", "step / online"],
                       rows)])
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


def render_body(d: dict, image: Callable[[str, str], str] | None = None) -> Body:
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


def render_markdown(d: dict, directory: Path, level: int = 1) -> str:
    """cache_formats.md (written by bench/cache_formats.py next to its PNG)."""
    b = render_body(d, default_image(directory, directory))
    return "\n".join([heading(level, "Teacher-cache formats"), b.text.rstrip(), "",
                      *[v.line() for v in b.verdicts], ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("static", "train", "all"), default="all")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--model", default=MODEL, help="static part: teacher (dense) and, pruned, student")
    ap.add_argument("--blocks", type=int, default=4, help="static part: C4 blocks")
    ap.add_argument("--seq-len", type=int, default=128, help="static part: tokens per block")
    ap.add_argument("--seeds", type=int, default=32, help="static part: independent draws per sampled format")
    ap.add_argument("--params", default="params/smollm2-quick.yaml", help="train part: preset")
    ap.add_argument("--steps", type=int, default=40, help="train part: steps per variant")
    ap.add_argument("--only", nargs="+", choices=[f.name for f in FORMATS], metavar="FORMAT",
                    help="train part: only these formats (plus the online reference)")
    ap.add_argument("--work-dir", default=None, help="train part: run directories "
                                                      "(default artifacts/bench/cache_formats/<preset>-<steps>steps)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    args.command = command_line(argv)
    import json
    path = args.out_dir / "cache_formats.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if args.part in ("static", "all"):
        data["static"] = run_static(args)
        for r in data["static"]["rows"]:
            print(f"{r['name']:>18}: {r['bytes_per_token']:7.0f} B/token  bias {r['bias']:.3f}  "
                  f"single draw {r['single_draw']:.3f}")
        write_outputs(data, args.out_dir)  # the static numbers survive a failing train part
    if args.part in ("train", "all"):
        data["train"] = run_train(args)
        for r in data["train"]["rows"]:
            print(f"{r['name']:>18}: ppl {r['ppl']}  ratio {r['ppl_ratio']}  step {r['step_s']} s  "
                  f"step ratio {r['step_ratio']}")
    write_outputs(data, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
