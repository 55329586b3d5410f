"""The fair method ladder: does AST's adaptive mask beat a fixed mask trained with the same distillation?

Every trained rung of one seed starts from the same initial (Wanda) mask,
reads the same blocks in the same order, with the same LR schedule, the same
teacher targets and the same number of tokens; rungs differ only in what the
table below says. Seeds change the data split, the block order and the sampled
teacher targets, for every rung alike.

  dense · oneshot-magnitude / -wanda / -sparsegpt (calibration: ``--calib-blocks``)
  naive       fixed mask, CE only
  fixed-kd    fixed mask, the same KD as AST (no refresh, no decay): the control
  fixed-kd-u2 the same with the u² second moment: the control of the u² rungs
  ast-paper   AST as the paper's text: magnitude refresh, v tracks u², λ_max = 1e-4 × 40k / steps
  ast-official AST as the official code: frozen-Wanda refresh, v tracks u², the same λ
  ast-default AST with the library's defaults: λ_max 1e-4, T0 50 %, Wanda refresh, AdamW's second moment
  ast-default-u2  the same with the u² second moment (the form that wins with a fixed mask)
  fixed-kd-slorb  fixed-kd + SLoRB (least-squares init): the control of ast-boosted-lstsq
  fixed-kd-slorb-u2 / ast-boosted-lstsq-u2  that pair with the u² second moment
  ast-boosted-mean / -lstsq  AST-Boosted with the paper's / the least-squares SLoRB init

The paper's λ_max = 1e-4 was set for 40k steps; ``ast-paper`` keeps λ_max·steps
(the decay's integral over the run) at the paper's value, T0 = 25% of steps.

Evaluation: WikiText-2 test over ``--windows`` windows of 512 tokens (≥ 128 =
64k tokens) with a 95% bootstrap interval over windows, and each rung's ratio
to ``fixed-kd`` paired on the same windows; C4 validation perplexity on the
held-out blocks during training (the curve, and the split on which "AST in its
best setting" is chosen for the larger budgets, never the test split).

Headline rows (bench/ladder_eval.py): a job per decisive and reference rung of the first seed at
the first budget scores the rung's export, loaded the stock way, on the whole WikiText-2 test split
and zero-shot (``--zero-shot-limit``, 500 items per task by default; the preset's tasks), each
window and item kept so that rungs compare paired.

Jobs run in priority order (the decisive rungs first, then the larger budgets,
then the rest); each finished job is written to ``<work>/jobs/`` and skipped on
a re-run, an unfinished one resumes from its last checkpoint, and the report is
rebuilt after every job, so an interrupted run reports what it finished.

    python -m bench.fair_ladder [--params params/smollm2-quick.yaml] [--seeds 0 1 2] [--steps 40 160 640]
                                [--windows 128] [--zero-shot-limit 500] [--work artifacts/bench/fair_ladder]
                                [--jobs KEY ...] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from ast_core.atomic import atomic_write_text  # noqa: E402
from ast_core.intervals import mean_sd, ppl_ratio_interval  # noqa: E402
from bench import ladder_eval  # noqa: E402
from bench import plotting  # noqa: E402
from bench.ladder import fail, resolve_params  # noqa: E402
from bench.ladder_eval import EVAL_RUNGS  # noqa: E402
from bench.runner import RESULTS, STAGES, WORK, Variant, run_variant, shared_base, stamp, write_json  # noqa: E402
from tasks.common import StageError, configure_threads  # noqa: E402
from tasks.config import ConfigError, PipelineConfig, load_config  # noqa: E402
from tasks.tables import gap_closed, markdown_table  # noqa: E402

PAPER_LAMBDA, PAPER_STEPS = 1e-4, 40_000
ONE_SHOT = ("dense", "oneshot-magnitude", "oneshot-wanda", "oneshot-sparsegpt")
AST_CHOICES = ("ast-paper", "ast-official", "ast-default", "ast-default-u2")  # "AST in its best setting" is one of these
CONTROL = "fixed-kd"
# the references every table and plot measures against: the dense model and the best one-shot 2:4 method
DENSE, ONE_SHOT_BEST = "dense", "oneshot-sparsegpt"
CONTROL_U2 = "fixed-kd-u2"
CONTROL_SLORB, CONTROL_SLORB_U2 = "fixed-kd-slorb", "fixed-kd-slorb-u2"  # the controls of AST-Boosted (lstsq init)


def control_of(rung: str) -> str | None:
    """The fixed-mask rung a rung is compared with: the one with the same second-moment form (fixed-kd-u2, the
    control of the u² rungs, is itself compared with fixed-kd: what the u² form alone does to a fixed mask);
    for AST-Boosted with the least-squares init, fixed-kd-slorb (the same SLoRB on a fixed mask). None where no
    rung differs in the mask alone: fixed-kd-slorb itself and AST-Boosted with the mean init (the SLoRB rows of
    the ingredients table compare those)."""
    if rung == CONTROL_U2:
        return CONTROL
    if rung in (CONTROL_SLORB, CONTROL_SLORB_U2, "ast-boosted-mean"):
        return None
    if rung.startswith("ast-boosted-lstsq"):  # the SLoRB control with the same second-moment form
        return CONTROL_SLORB_U2 if rung.endswith("-u2") else CONTROL_SLORB
    return CONTROL_U2 if "train.second_moment=update" in rung_overrides(rung, 40) else CONTROL


def rung_overrides(name: str, steps: int) -> list[str]:
    """What makes rung ``name`` differ from the shared base at a budget of ``steps`` steps."""
    lam = min(1.0, PAPER_LAMBDA * PAPER_STEPS / steps)
    paper = [f"train.lambda_max={lam:.6g}", f"train.t0_steps={max(1, steps // 4)}", "train.second_moment=update"]
    table = {
        "dense": ["train.method=dense"],
        "oneshot-magnitude": ["train.method=oneshot-magnitude"],
        "oneshot-wanda": ["train.method=oneshot-wanda"],
        "oneshot-sparsegpt": ["train.method=oneshot-sparsegpt"],
        "naive": ["train.method=naive", "train.second_moment=gradient"],
        "fixed-kd": ["train.method=fixed-kd", "train.second_moment=gradient"],
        # the control for the rungs whose optimizer's v tracks u² (the paper's form): with λ = 0 that form
        # changes the kept weights' steps too, so it needs its own fixed-mask control
        "fixed-kd-u2": ["train.method=fixed-kd", "train.second_moment=update"],
        "ast-paper": ["train.method=ast-naive", "train.refresh_score=magnitude", *paper],
        "ast-official": ["train.method=ast-naive", "train.refresh_score=wanda", *paper],
        # the library's AST defaults (Wanda refresh, the preset's λ, v tracks (g+λd)², AdamW's form); T0 kept
        # at the preset's share of the steps (50%). Each rung names its second moment, so the rung means the same
        # whatever the preset says (smollm2-quick used `update` for a while)
        "ast-default": ["train.method=ast-naive", f"train.t0_steps={max(1, steps // 2)}",
                        "train.second_moment=gradient"],
        "ast-default-u2": ["train.method=ast-naive", f"train.t0_steps={max(1, steps // 2)}",
                           "train.second_moment=update"],
        # the control of ast-boosted-lstsq: the same SLoRB, init and optimizer on a mask that never moves (T0 named
        # as there, though without decay it does nothing, so the two configs differ in the method alone)
        "fixed-kd-slorb": ["train.method=fixed-kd-slorb", "train.slorb_init=lstsq",
                           f"train.t0_steps={max(1, steps // 2)}", "train.second_moment=gradient"],
        "ast-boosted-mean": ["train.method=ast-boosted", "train.slorb_init=mean",
                             f"train.t0_steps={max(1, steps // 2)}", "train.second_moment=gradient"],
        "ast-boosted-lstsq": ["train.method=ast-boosted", "train.slorb_init=lstsq",
                              f"train.t0_steps={max(1, steps // 2)}", "train.second_moment=gradient"],
    }
    # the SLoRB pair with the u² second moment (the form that wins without SLoRB on a fixed mask)
    table[CONTROL_SLORB_U2] = [*table[CONTROL_SLORB][:-1], "train.second_moment=update"]
    table["ast-boosted-lstsq-u2"] = [*table["ast-boosted-lstsq"][:-1], "train.second_moment=update"]
    if name not in table:
        raise ConfigError(f"unknown rung {name!r}; known: {', '.join(table)}")
    return table[name]


RUNGS = ("dense", "oneshot-magnitude", "oneshot-wanda", "oneshot-sparsegpt", "naive", "fixed-kd", "fixed-kd-u2",
         "ast-paper", "ast-official", "ast-default", "ast-default-u2", "fixed-kd-slorb", "fixed-kd-slorb-u2",
         "ast-boosted-mean", "ast-boosted-lstsq", "ast-boosted-lstsq-u2")


def base_overrides(steps: int, seed: int, windows: int | None, calib_blocks: int, val_blocks: int,
                   batch: int) -> list[str]:
    """The settings every rung of one (budget, seed) shares."""
    return [f"seed={seed}", f"train.steps={steps}", f"data.max_train_blocks={steps * batch}",
            f"train.eval_every={max(1, steps // 4)}", f"train.checkpoint_every={min(steps, 40)}",
            f"data.calib_blocks={calib_blocks}", f"data.val_blocks={val_blocks}",
            f"evaluate.max_windows={'null' if windows is None else windows}",
            "evaluate.check_windows=8",  # the trained model vs the export on 8 windows; the export on all
            "evaluate.zero_shot.enabled=false"]


@dataclass(frozen=True)
class Job:
    steps: int
    seed: int
    rung: str
    kind: str = "train"  # or "eval": the headline evaluation of the training job with the same steps, seed, rung

    @property
    def key(self) -> str:
        return ("eval-" if self.kind == "eval" else "") + f"s{self.steps}-seed{self.seed}-{self.rung}"

    def record(self) -> dict[str, int | str]:
        """The job as its training record names it (steps, seed, rung; the same in every commit's records)."""
        return {"steps": self.steps, "seed": self.seed, "rung": self.rung}

    @property
    def trained(self) -> "Job":
        """The training job this job needs (itself for a training job)."""
        return Job(self.steps, self.seed, self.rung)


def plan(seeds: list[int], budgets: list[int], best: str | None, headline: bool = False) -> list[Job]:
    """Jobs in priority order: what decides the question first, then the larger budgets, (the headline
    evaluation of the first seed's decisive rungs and references,) then the rest."""
    small, larger = budgets[0], budgets[1:]
    decisive = (CONTROL, "ast-paper", "ast-default", CONTROL_U2, "ast-official", "ast-default-u2")
    jobs = [Job(small, s, r) for s in seeds for r in decisive]
    jobs += [Job(small, seeds[0], r) for r in (DENSE, ONE_SHOT_BEST)]
    for b in larger:  # one seed at the larger budgets
        best_ = best or "ast-default"
        jobs += [Job(b, seeds[0], r) for r in dict.fromkeys((control_of("ast-paper"), "ast-paper",
                                                              control_of(best_), best_))]
    if headline:
        jobs += [Job(small, seeds[0], r, "eval") for r in EVAL_RUNGS]
    jobs += [Job(small, seeds[0], r) for r in ("oneshot-wanda", "oneshot-magnitude")]
    jobs += [Job(small, s, r) for s in seeds for r in ("naive", "ast-boosted-lstsq", CONTROL_SLORB,
                                                        "ast-boosted-lstsq-u2", CONTROL_SLORB_U2,
                                                        "ast-boosted-mean")]
    return list(dict.fromkeys(jobs))


def job_config(params: str, job: Job, args: argparse.Namespace) -> tuple[list[str], PipelineConfig]:
    pre = load_config(params, args.overrides)
    batch = pre.train.batch_size * pre.train.grad_accum
    base = [*base_overrides(job.steps, job.seed, args.windows, args.calib_blocks, args.val_blocks, batch),
            *args.overrides]
    return base, load_config(params, [*base, *rung_overrides(job.rung, job.steps)])


def parse_job(key: str) -> Job:
    """``s40-seed0-fixed-kd`` → Job(40, 0, "fixed-kd"), ``eval-s40-seed0-fixed-kd`` its headline evaluation; a
    bad key is a ConfigError naming it."""
    import re
    m = re.fullmatch(r"(eval-)?s(\d+)-seed(\d+)-(.+)", key)
    if not m or m.group(4) not in RUNGS:
        raise ConfigError(f"--jobs: {key!r} is not [eval-]sSTEPS-seedN-RUNG with a rung of {', '.join(RUNGS)}")
    return Job(int(m.group(2)), int(m.group(3)), m.group(4), "eval" if m.group(1) else "train")


def git_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def run_job(params: str, job: Job, args: argparse.Namespace, commit: str | None) -> dict[str, Any]:
    base, cfg = job_config(params, job, args)
    root = Path(args.work).resolve() / f"steps{job.steps}" / f"seed{job.seed}"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    shared = shared_base(params, base, root)
    v = Variant(job.rung, rung_overrides(job.rung, job.steps))
    r = run_variant(shared, cfg, v, root, STAGES, resume=True)
    return {"job": job.record(), "started": started, "commit_at_start": commit,
            "config": cfg.model_dump(mode="json"), "metrics": r.metrics, "history": r.history,
            "train": r.train, "wall_s": r.wall_s}


# ----------------------------------------------------------------------------- results -> rows

def mask_change(history: list[dict]) -> tuple[float | None, float | None]:
    """(cumulative share of mask bits changed vs the initial mask at the end, mean per-refresh flip rate)."""
    flips = [h for h in history if "flip_rate_prev" in h]
    if not flips:
        return None, None
    return float(flips[-1]["flip_rate_init"]), sum(h["flip_rate_prev"] for h in flips) / len(flips)


def final_val_ppl(history: list[dict]) -> float | None:
    vals = [h["val_ppl"] for h in history if "val_ppl" in h]
    return float(vals[-1]) if vals else None


def best_ast(results: list[dict], steps: int) -> str | None:
    """The AST setting with the lowest mean final C4 *validation* perplexity at ``steps`` (never the test), over
    the seeds every candidate that ran has run (a setting with an easier seed alone must not win)."""
    by: dict[str, dict[int, float]] = {}
    for r in results:
        v = final_val_ppl(r["history"])
        if r["job"]["rung"] in AST_CHOICES and r["job"]["steps"] == steps and v is not None:
            by.setdefault(r["job"]["rung"], {})[r["job"]["seed"]] = v
    if not by:
        return None
    common = set.intersection(*(set(s) for s in by.values()))  # empty: each setting over its own seeds
    means = {n: sum(vals[s] for s in (common or vals)) / len(common or vals) for n, vals in by.items()}
    return min(means, key=means.get)


def summarize(results: list[dict]) -> list[dict[str, Any]]:
    """One row per (budget, rung): ppl mean ± sd over seeds, per-seed ppl + CI, ratio to its fixed-mask control
    (``fixed-kd``, or ``fixed-kd-u2`` for rungs whose v tracks u², when it has run), paired on windows."""
    by: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        by.setdefault((r["job"]["steps"], r["job"]["rung"]), []).append(r)
    ref = {(r["job"]["steps"], r["job"]["seed"], r["job"]["rung"]): r for r in results
           if r["job"]["rung"] in (CONTROL, CONTROL_U2, CONTROL_SLORB, CONTROL_SLORB_U2)}
    dense = next((r["metrics"]["ppl_wikitext2_dense"] for r in results if "ppl_wikitext2_dense" in r["metrics"]),
                 None)
    sgpt = [r["metrics"]["ppl_wikitext2"] for r in results if r["job"]["rung"] == ONE_SHOT_BEST]
    rows = []
    for (steps, rung), rs in sorted(by.items(), key=lambda kv: (kv[0][0], RUNGS.index(kv[0][1]))):
        rs = sorted(rs, key=lambda r: r["job"]["seed"])
        ppls = [r["metrics"]["ppl_wikitext2"] for r in rs]
        mean, sd = mean_sd(ppls)
        ratios = []
        control = control_of(rung) if rung in RUNGS else CONTROL
        if control in (CONTROL, CONTROL_U2) and not any((steps, r["job"]["seed"], control) in ref for r in rs):
            control = CONTROL  # its own control not run (yet): compare with plain fixed-kd, and say so
        for r in rs:
            c = ref.get((steps, r["job"]["seed"], control))
            if c is not None and rung != control and rung not in ONE_SHOT and r["metrics"].get("ppl_window_nll") \
                    and c["metrics"].get("ppl_window_nll"):
                ratios.append(ppl_ratio_interval(r["metrics"]["ppl_window_nll"], c["metrics"]["ppl_window_nll"]))
        cum, per = zip(*(mask_change(r["history"]) for r in rs))
        vals = [v for v in (final_val_ppl(r["history"]) for r in rs) if v is not None]
        tps = [h["tokens_per_s"] for r in rs for h in r["history"] if "tokens_per_s" in h]
        rows.append({
            "steps": steps, "rung": rung, "seeds": [r["job"]["seed"] for r in rs],
            "tokens": int(rs[0]["metrics"].get("tokens_trained", 0)),
            "ppl": ppls, "ppl_mean": mean, "ppl_sd": sd,
            "ppl_ci95": [r["metrics"].get("ppl_wikitext2_ci95") for r in rs],
            "windows": rs[0]["metrics"].get("ppl_windows"),
            "control": control,
            "ratio_to_control": ratios,
            "gap_closed": gap_closed(mean, mean_sd(sgpt)[0] if sgpt else None, dense),  # vs its seeds' mean
            "val_ppl_mean": sum(vals) / len(vals) if vals else None,
            "mask_change_vs_init": [c for c in cum if c is not None] or None,
            "flip_per_refresh": [p for p in per if p is not None] or None,
            "tokens_per_s": sum(tps) / len(tps) if tps else None,
        })
    return rows


# What each ingredient buys, as the ladder separates it: (ingredient, the rung with it, the same rung without it).
# The adaptive mask is the verdicts' question (each AST rung vs its fixed-mask control); the u² form is fixed-kd-u2's.
INGREDIENTS = (("distillation (KD)", CONTROL, "naive"),
               ("SLoRB on a fixed mask", CONTROL_SLORB, CONTROL),
               ("SLoRB on the adaptive mask, least-squares init", "ast-boosted-lstsq", "ast-default"),
               ("SLoRB on the adaptive mask, the paper's mean init", "ast-boosted-mean", "ast-default"),
               ("SLoRB init: the paper's mean instead of least squares", "ast-boosted-mean", "ast-boosted-lstsq"),
               ("u² second moment, fixed mask + SLoRB", CONTROL_SLORB_U2, CONTROL_SLORB),
               ("u² second moment, AST-Boosted", "ast-boosted-lstsq-u2", "ast-boosted-lstsq"))


def _word(ratios: list[tuple[float, float, float]]) -> str:
    """better / worse only when every seed's paired interval excludes 1 on the same side."""
    return ("better" if max(hi for _, _, hi in ratios) < 1 else "worse" if min(lo for _, lo, _ in ratios) > 1
            else "no measurable difference")


def ingredient_rows(results: list[dict]) -> list[dict[str, Any]]:
    """Per budget and ingredient: ppl(with) / ppl(without), paired on windows, for every seed both have run."""
    by = {(r["job"]["steps"], r["job"]["seed"], r["job"]["rung"]): r for r in results}
    rows, seeds = [], sorted({k[1] for k in by})
    for steps in sorted({k[0] for k in by}):
        for what, with_, without in INGREDIENTS:
            pairs = [(seed, by[(steps, seed, with_)], by[(steps, seed, without)])
                     for seed in seeds if (steps, seed, with_) in by and (steps, seed, without) in by]
            ratios = [(seed, ppl_ratio_interval(a["metrics"]["ppl_window_nll"], b["metrics"]["ppl_window_nll"]))
                      for seed, a, b in pairs if a["metrics"].get("ppl_window_nll")
                      and b["metrics"].get("ppl_window_nll")]
            if ratios:
                rows.append({"steps": steps, "tokens": int(pairs[0][1]["metrics"].get("tokens_trained", 0)),
                             "ingredient": what, "with": with_, "without": without,
                             "seeds": [s for s, _ in ratios], "ratio": [r for _, r in ratios],
                             "verdict": _word([r for _, r in ratios])})
    return rows


def ingredient_table(rows: list[dict[str, Any]]) -> str:
    head = ["budget (tokens)", "ingredient", "ppl with / without, paired [95% CI] per seed", "seeds", "reading"]
    body = [[f"{r['tokens']:,}", f"{r['ingredient']} ({r['with']} / {r['without']})",
             "; ".join(f"{x:.3f} [{lo:.3f}, {hi:.3f}]" for x, lo, hi in r["ratio"]),
             ",".join(map(str, r["seeds"])), r["verdict"]] for r in rows]
    return markdown_table(head, body, align="rllll")


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Per budget and AST rung: better / worse / no measurable difference vs its fixed-mask control.

    "better" only when every seed's paired 95% interval of ppl / fixed-kd lies below 1 (and
    "worse" above 1); anything else, including a single seed whose interval straddles 1, is
    "no measurable difference".
    """
    out = []
    for r in rows:
        if not (r["rung"].startswith("ast-") or r["rung"] == CONTROL_U2) or not r["ratio_to_control"]:
            continue
        his = [hi for _, _, hi in r["ratio_to_control"]]
        los = [lo for _, lo, _ in r["ratio_to_control"]]
        mean = sum(x for x, _, _ in r["ratio_to_control"]) / len(r["ratio_to_control"])
        word = {"better": "better than", "worse": "worse than"}.get(_word(r["ratio_to_control"]),
                                                                   "no measurable difference from")
        out.append(f"{r['tokens']:,} tokens, {r['rung']}: {word} {r.get('control', CONTROL)} (ppl ratio {mean:.3f}, "
                   f"{len(his)} seed(s), paired 95% intervals {', '.join(f'[{lo:.3f}, {hi:.3f}]' for lo, hi in zip(los, his))})")
    return out


def _f(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["budget (tokens)", "rung", "seeds", "WikiText-2 ppl (mean ± sd)", "per seed [95% CI]",
            "ppl / its fixed-mask control, paired [95% CI]", "gap closed vs SparseGPT", "C4 val ppl",
            "mask change vs initial", "flips per refresh", "tokens/s"]
    body = []
    for r in rows:
        sd = f" ± {r['ppl_sd']:.2f}" if r["ppl_sd"] is not None else ""
        per = "; ".join(f"{p:.2f}" + (f" [{c[0]:.2f}, {c[1]:.2f}]" if c else "")
                        for p, c in zip(r["ppl"], r["ppl_ci95"]))
        ratio = ("; ".join(f"{x:.3f} [{lo:.3f}, {hi:.3f}]" for x, lo, hi in r["ratio_to_control"])
                 + f" (vs {r.get('control', CONTROL)})") if r["ratio_to_control"] else "—"
        cum = ", ".join(f"{c:.2%}" for c in r["mask_change_vs_init"]) if r["mask_change_vs_init"] else "—"
        per_r = ", ".join(f"{c:.3%}" for c in r["flip_per_refresh"]) if r["flip_per_refresh"] else "—"
        body.append([f"{r['tokens']:,}", r["rung"], ",".join(map(str, r["seeds"])), f"{r['ppl_mean']:.2f}{sd}", per,
                     ratio, _f(r["gap_closed"], ".1%"), _f(r["val_ppl_mean"], ".2f"), cum, per_r,
                     _f(r["tokens_per_s"], ".0f")])
    return markdown_table(head, body, align="rll" + "r" * (len(head) - 3))


def render(report: dict[str, Any]) -> str:
    return "## Fair method ladder: adaptive vs fixed mask with the same distillation\n\n" + render_body(report)


def render_body(report: dict[str, Any], image=None) -> str:  # type: ignore[no-untyped-def]
    """The section text (``fair_ladder.md`` and ``docs/RESULTS.md``); ``image(name, alt)`` embeds a plot."""
    s = report["stamp"]
    pics = [image("fair_ladder_budget.png", "WikiText-2 perplexity vs training tokens per rung"),
            image("fair_ladder.png", "C4 validation perplexity vs training tokens")] if image else []
    return "\n".join([
        f"Jobs ran at commit(s) {', '.join(sorted({j['commit_at_start'][:7] for j in report.get('jobs', []) if j.get('commit_at_start')})) or report['commit_at_start']} "
        f"(each job's commit and resolved config are in fair_ladder.json); report built {report['started']} on {s['machine']} (torch {s['torch']}, "
        f"{s['threads']} threads); params `{report['params']}`; {report['done']} of {report['planned']} planned "
        "jobs finished.",
        "",
        f"Evaluation: WikiText-2 test, {report['windows'] or 'all'} windows × {report['eval_seq_len']} tokens; intervals are 95% bootstrap "
        "intervals over windows; the ratio to the fixed-mask control (fixed-kd; fixed-kd-u2 for the rungs whose "
        "optimizer tracks u², once it has run; fixed-kd-u2 itself against fixed-kd, the u² form alone; fixed-kd-slorb "
        "and its u² twin for AST-Boosted with the same SLoRB init) is paired on the same windows and the same seed. "
        f"One-shot calibration: {report['calib_blocks']} blocks × {report['seq_len']} tokens. "
        "\"AST in its best setting\" for the larger budgets is chosen on C4 validation perplexity "
        f"(held-out blocks), never on the test split: **{report['best_ast']}**.",
        "",
        table(report["rows"]),
        "tokens/s: the mean over a job's training steps as measured, on a machine other jobs shared at times; "
        "it is not a throughput benchmark (`python -m bench.train_throughput` is).",
        "",
        "Verdicts (a rung is better or worse than its fixed-mask control only when every seed's paired interval "
        "excludes 1):",
        "",
        *[f"- {v}" for v in verdicts(report["rows"])],
        "",
        *(["What the other ingredients buy, each rung against the same rung without it (same seed, same "
           "windows; the same reading rule):", "", ingredient_table(report["ingredients"]), ""]
          if report.get("ingredients") else []),
        *ladder_eval.render(report.get("headline_rows") or [], report.get("zero_shot_limit")),
        *pics,
        "Plots: `fair_ladder_budget.png` (WikiText-2 perplexity vs training tokens, mean over seeds, per rung), "
        "`fair_ladder.png` (C4 validation perplexity vs training tokens, seed 0).",
        "",
        f"Command: `{report['command']}`",
        "",
    ])


def write_report(results: list[dict], args: argparse.Namespace, planned: int, commit: str | None,
                 started: str, best: str | None, params: str, headline: list[dict] | None = None) -> None:
    out = Path(args.out_dir)
    pre = load_config(params, args.overrides)
    report = {"stamp": stamp(), "started": started, "commit_at_start": commit, "params": args.params,
              "command": "python -m bench.fair_ladder " + " ".join(a for a in sys.argv[1:] if a != "--report-only"),
              "windows": args.windows, "calib_blocks": args.calib_blocks, "seq_len": pre.data.seq_len,
              "eval_seq_len": pre.evaluate.seq_len,
              "planned": planned, "done": len(results), "best_ast": best,
              "rows": summarize(results),
              "ingredients": ingredient_rows(results),
              "zero_shot_limit": args.zero_shot_limit,
              "headline_rows": ladder_eval.summarize(headline or [], control_of, RUNGS, ONE_SHOT),
              "curves": {f"{r['job']['rung']} ({r['job']['steps']} steps)":
                         [[h["tokens"], h["val_ppl"]] for h in r["history"] if "val_ppl" in h]
                         for r in results if r["job"]["seed"] == min(args.seeds) and r["history"]},
              "jobs": [{k: r[k] for k in ("job", "started", "commit_at_start", "config", "wall_s")} for r in results]}
    write_json(out / "fair_ladder.json", report)
    atomic_write_text(out / "fair_ladder.md", render(report))
    budget: dict[str, tuple[list[int], list[float]]] = {}
    for r in report["rows"]:
        if r["tokens"]:  # trained rungs: one point per budget
            xs, ys = budget.setdefault(r["rung"], ([], []))
            xs.append(r["tokens"])
            ys.append(r["ppl_mean"])
    refs = {r["rung"]: r["ppl_mean"] for r in report["rows"] if r["rung"] in (DENSE, ONE_SHOT_BEST)}
    if budget:  # budgets grow 4x a step: a log axis spaces them evenly
        plotting.line_plot(out / "fair_ladder_budget.png", budget,
                           title="WikiText-2 perplexity vs training tokens (mean over seeds)",
                           xlabel="training tokens (log scale)", ylabel="perplexity (log scale)",
                           logx=True, logy=True, hlines=refs)
    series = {n: ([p[0] for p in pts], [p[1] for p in pts]) for n, pts in report["curves"].items() if pts}
    if series:
        plotting.line_plot(out / "fair_ladder.png", series,
                           title="C4 validation perplexity vs training tokens (seed 0)",
                           xlabel="training tokens", ylabel="perplexity (log scale)", logy=True)


def load_done(work: Path, folder: str = "jobs") -> dict[str, dict]:
    """Finished jobs by key: training jobs in ``<work>/jobs``, headline evaluations in ``<work>/eval``."""
    jobs = work / folder
    return {p.stem: json.loads(p.read_text()) for p in sorted(jobs.glob("*.json"))} if jobs.is_dir() else {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.fair_ladder", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params/smollm2-quick.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 160, 640],
                    help="budgets in steps; the first is the full ladder, the others the decisive rungs")
    ap.add_argument("--windows", type=lambda v: None if v == "all" else int(v), default=128,
                    help="WikiText-2 windows of 512 tokens (all: the whole test split)")
    ap.add_argument("--calib-blocks", type=int, default=256, help="calibration blocks (one-shot + initial mask)")
    ap.add_argument("--val-blocks", type=int, default=64, help="held-out C4 blocks for validation")
    ap.add_argument("--zero-shot-limit", type=int, default=500,
                    help="items per zero-shot task in the headline evaluation jobs (0: no such jobs)")
    ap.add_argument("--headline-windows", type=int, default=None,
                    help="WikiText-2 windows in the headline evaluation (default: the whole test split)")
    ap.add_argument("--zero-shot-tasks", nargs="+", default=None, metavar="TASK",
                    help="zero-shot tasks (default: the preset's evaluate.zero_shot.tasks)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=WORK / "fair_ladder")
    ap.add_argument("--max-jobs", type=int, default=None, help="stop after this many new jobs")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from finished jobs")
    ap.add_argument("--jobs", nargs="+", default=None, metavar="KEY",
                    help="run these jobs first, in this order (keys as s40-seed0-fixed-kd), then stop")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = resolve_params(args.params)
    work = Path(args.work).resolve()
    configure_threads()
    commit = git_commit()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    done, ev_done = load_done(work), load_done(work, "eval")
    pre = load_config(params, args.overrides)
    zs_tasks = args.zero_shot_tasks or pre.evaluate.zero_shot.tasks
    ran, skipped = 0, set()  # evaluation jobs whose training job's export is gone: said once, not retried
    try:
        while True:
            results = list(done.values())
            best = best_ast(results, args.steps[0])
            jobs = plan(args.seeds, args.steps, best, headline=args.zero_shot_limit > 0)
            write_report(results, args, len(jobs), commit, started, best, params, list(ev_done.values()))
            finished = {**done, **ev_done}
            todo = [j for j in jobs if j.key not in finished]
            if args.jobs is not None:
                todo = [parse_job(k) for k in args.jobs if k not in finished]
            todo = [j for j in todo if (j.trained.key in done or j.kind == "train") and j.key not in skipped]
            if args.report_only or not todo or (args.max_jobs is not None and ran >= args.max_jobs):
                break
            job = todo[0]
            print(f"[{len(finished) + 1}/{len(jobs)}] {job.key}", flush=True)
            t = time.perf_counter()
            if job.kind == "eval":
                try:
                    res = ladder_eval.run_eval(work, done[job.trained.key], zs_tasks, args.zero_shot_limit,
                                               pre.evaluate.zero_shot.batch_size, commit, args.headline_windows)
                except ladder_eval.ExportMissing as err:
                    print(f"    skipped: {err}", flush=True)
                    skipped.add(job.key)
                    continue
                write_json(work / "eval" / f"{job.key}.json", res)
                ev_done[job.key] = res
                what = f"whole-split ppl {res['ppl']:.2f}; " + ", ".join(f"{t} {a:.3f}" for t, a in res["acc"].items())
            else:
                res = run_job(params, job, args, commit)
                write_json(work / "jobs" / f"{job.key}.json", res)
                done[job.key] = res
                what = f"ppl {res['metrics'].get('ppl_wikitext2', float('nan')):.2f}"
            ran += 1
            print(f"    {what} ({time.perf_counter() - t:.0f} s)", flush=True)
    except (ConfigError, StageError) as err:
        return fail(err)
    print(table(summarize(list(done.values()))), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
