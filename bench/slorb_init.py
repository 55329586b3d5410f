"""SLoRB initialisation: the paper's mean init vs the least-squares init, at the bench budget.

Why: the paper sets each SLoRB entry to the mean of its group's pruned weights.
On SmolLM2-135M with a Wanda 2:4 mask that *raises* perplexity before any
training, because real inputs are not constant within a group (outlier
channels are what Wanda keeps). ``train.slorb_init: lstsq`` fits S to the
calibration inputs instead (``ast_core.slorb.lstsq_S``). This bench trains
AST-Boosted with each init, plus AST-Naive (no SLoRB) as the reference, on the
same blocks, cache and seed, and records the validation curve from step 0, so
both the starting point and what is left of the difference after training show.

    python -m bench.slorb_init [--params params/smollm2-quick.yaml] [--steps 40]
                               [--set k=v ...] [--out-dir bench/results] [--work artifacts/bench/slorb_init]

Writes ``slorb_init.json``, ``slorb_init.md`` and ``slorb_init.png`` (validation
perplexity vs tokens) under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

from ast_core.atomic import atomic_write_text  # noqa: E402
from bench import plotting  # noqa: E402
from bench.ladder import (bench_parser, budget_of, command_line, curve, fail, resolve_params,  # noqa: E402
                          run_bench, train_seconds)
from bench.runner import Variant, write_json  # noqa: E402
from tasks.common import StageError  # noqa: E402
from tasks.config import ConfigError, PipelineConfig  # noqa: E402
from bench.report import Body, default_image, fmt, heading, stamp_line  # noqa: E402
from tasks.tables import markdown_table  # noqa: E402

SETTINGS = ["evaluate.zero_shot.enabled=false"]
VARIANTS = {  # name -> (overrides, SLoRB init or None)
    "no-slorb": (["train.method=ast-naive"], None),
    "mean": (["train.method=ast-boosted", "train.slorb_init=mean"], "mean"),
    "lstsq": (["train.method=ast-boosted", "train.slorb_init=lstsq"], "lstsq"),
}
LABELS = {"no-slorb": "AST-Naive (no SLoRB)", "mean": "AST-Boosted, mean init (paper)",
          "lstsq": "AST-Boosted, least-squares init"}


def row(name: str, metrics: dict, history: list[dict], steps: int) -> dict[str, Any]:
    points = curve(history)
    return {"name": name, "label": LABELS[name], "slorb_init": VARIANTS[name][1],
            "method": metrics.get("method"), "ppl": metrics.get("ppl_wikitext2"),
            "ppl_dense": metrics.get("ppl_wikitext2_dense"), "curve": points,
            "val_ppl_start": points[0][1] if points and points[0][0] == 0 else None,
            "val_ppl_end": points[-1][1] if points else None,
            "train_s": train_seconds(history, steps)}


def build_report(rows: list[dict[str, Any]], *, cfg: PipelineConfig, params: str, command: str,
                 stamp_: dict, wall_s: float | None = None) -> dict[str, Any]:
    """Everything ``slorb_init.json`` holds (pure: tests build it from synthetic rows)."""
    return {"stamp": stamp_, "command": command, "params": params, "model": cfg.model.student,
            "budget": budget_of(cfg), "slorb_group": cfg.train.slorb_group,
            "evaluation": {"wikitext2_windows": cfg.evaluate.max_windows, "seq_len": cfg.evaluate.seq_len,
                           "val_blocks": cfg.data.val_blocks, "val_seq_len": cfg.data.seq_len},
            "rows": rows, "wall_s": wall_s}


def write_outputs(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """``slorb_init.json``, ``slorb_init.md`` and ``slorb_init.png`` (each written atomically)."""
    out_dir = Path(out_dir)
    write_json(out_dir / "slorb_init.json", report)
    atomic_write_text(out_dir / "slorb_init.md", render_markdown(report, out_dir))
    series = {r["label"]: ([p[0] for p in r["curve"]], [p[1] for p in r["curve"]]) for r in report["rows"]}
    png = plotting.line_plot(out_dir / "slorb_init.png", series, logy=True,
                             title=f"validation perplexity from step 0 ({report['budget']['steps']} steps)",
                             xlabel="training tokens", ylabel="validation perplexity (log scale)")
    return [out_dir / "slorb_init.json", out_dir / "slorb_init.md", png]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return bench_parser("slorb_init.py", __doc__, steps=40, work="slorb_init").parse_args(argv)


# ----------------------------------------------------------------------------- report section

def render_body(d: dict, image: Callable[[str, str], str]) -> Body:
    """SLoRB init: AST-Naive (no SLoRB), AST-Boosted with the paper's mean init and with least squares."""
    b, e = d["budget"], d["evaluation"]
    rows = [[r["label"], fmt(r.get("val_ppl_start"), ".1f"), fmt(r.get("val_ppl_end"), ".1f"), fmt(r.get("ppl"))]
            for r in d["rows"]]
    lines = [f"Model `{d['model']}`, params `{d['params']}`, SLoRB group {d['slorb_group']}. Budget per run: "
             f"{b['steps']} steps × {b['batch']}×{b['seq_len']} tokens = {b['tokens']:,} tokens (same blocks, "
             f"order, teacher cache and seed). Validation: {e['val_blocks']}×{e['val_seq_len']} held-out C4 tokens, "
             f"step 0 = after the initial mask (and SLoRB init), before any training step. WikiText-2 test over "
             f"{e['wikitext2_windows']} windows × {e['seq_len']} tokens after training.", "",
             markdown_table(["run", "val ppl at step 0", "val ppl at the end", "WikiText-2 ppl"], rows),
             image("slorb_init.png", "validation perplexity vs tokens per SLoRB init")]
    return Body("\n".join(lines), [])


def render_markdown(d: dict, directory: Path, level: int = 1) -> str:
    """slorb_init.md (written by bench/slorb_init.py next to its PNG)."""
    b = render_body(d, default_image(directory, directory))
    return "\n".join([heading(level, "SLoRB initialisation"), stamp_line(d), "", f"Command: `{d['command']}`", "",
                      b.text.rstrip(), ""])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    variants = [Variant(name, list(overrides)) for name, (overrides, _) in VARIANTS.items()]
    try:  # the ladder's T0 (a quarter of the steps), so the rows compare with its AST rungs
        run = run_bench("slorb init", resolve_params(args.params), args.steps,
                        [f"train.t0_steps={args.steps // 4}", *SETTINGS], args.overrides, variants, args.work,
                        f"{len(variants)} runs")
    except (ConfigError, StageError) as err:
        return fail(err)
    rows = [row(v.name, run.results[v.name].metrics, run.results[v.name].history, run.budget["steps"])
            for v in variants]
    report = build_report(rows, cfg=run.cfg, params=args.params, command=command_line("slorb_init.py", argv),
                          stamp_=run.stamp, wall_s=run.wall_s)
    written = write_outputs(report, args.out_dir)
    for r in rows:
        print(f"{r['label']:>34}: val ppl {r['val_ppl_start']} -> {r['val_ppl_end']}, WikiText-2 {r['ppl']}")
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
