"""Run pipeline variants side by side on one prepared data set (and one teacher cache).

Every benchmark that trains (the method ladder, the decay sweep, the cache
formats) is a list of :class:`Variant` — a name plus ``--set`` overrides — run
through the pipeline's own stage functions (:func:`tasks.pipeline.run_stage`:
the code path of the CLI, Prefect and DVC, tracked in MLflow like any run).
``prepare`` and ``cache-teacher`` run once in ``<root>/shared``; each variant
gets ``<root>/<name>`` with the shared inputs linked in (:mod:`tasks.shared`).

Re-running a benchmark skips every variant whose stages are up to date (stage
fingerprints), so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from tasks.common import RunContext, configure_threads  # noqa: E402
from tasks.config import PipelineConfig, load_config  # noqa: E402
from tasks.shared import open_shared, open_variant  # noqa: E402

RESULTS = REPO / "bench" / "results"
WORK = REPO / "artifacts" / "bench"


# every benchmark runs these per variant (prepare is shared); evaluate scores the export that compile writes
STAGES = ("cache-teacher", "train", "compile", "evaluate")


@dataclass
class Variant:
    """One run of a benchmark: ``overrides`` are ``section.key=value`` strings applied after the base ones."""
    name: str
    overrides: list[str] = field(default_factory=list)
    share_cache: bool = True  # False when the variant's teacher-cache settings differ from the shared base


@dataclass
class VariantResult:
    name: str
    metrics: dict
    history: list[dict]
    train: dict
    cache: dict
    wall_s: float
    out: Path


def configs(params: str, base: list[str], variants: list[Variant]) -> dict[str, PipelineConfig]:
    """Every variant's validated config, before any work: a bad override fails the whole benchmark at once."""
    return {v.name: load_config(params, [*base, *v.overrides]) for v in variants}


def shared_base(params: str, base: list[str], root: Path, method: str = "ast-naive") -> RunContext:
    """``prepare`` + ``cache-teacher`` once, in ``<root>/shared`` (``method`` must use a teacher)."""
    from tasks.pipeline import run_stage
    return open_shared(load_config(params, [*base, f"train.method={method}"]), root, run_stage, progress=True)


def run_variant(shared: RunContext, cfg: PipelineConfig, variant: Variant, root: Path,
                stages: tuple[str, ...] = STAGES,
                resume: bool = False) -> VariantResult:
    """Run ``stages`` of one variant in ``<root>/<name>`` on the shared inputs; returns what it measured.

    ``resume``: an interrupted training continues from its last checkpoint (else it starts over).
    """
    from tasks.pipeline import run_stage
    # progress bars: a benchmark's variant can train for most of an hour (the fair ladder's largest budget)
    ctx = open_variant(shared, cfg, root, variant.name, cache=variant.share_cache, resume=resume, progress=True)
    run_stage(ctx, "prepare")  # the linked files match: it only records itself as done here
    start = time.perf_counter()
    for stage in stages:
        run_stage(ctx, stage)
    wall = time.perf_counter() - start
    # a finished variant never resumes: its checkpoints (weights + optimizer state, ~4x the model)
    # would only fill the disk over a ladder or sweep; train/final keeps the trained model
    shutil.rmtree(ctx.stage_dir("train") / "checkpoints", ignore_errors=True)
    hist_path = ctx.stage_dir("train") / "history.jsonl"
    history = [json.loads(line) for line in hist_path.read_text().splitlines()] if hist_path.exists() else []
    metrics_path = ctx.out / "metrics.json"
    return VariantResult(name=variant.name,
                         metrics=json.loads(metrics_path.read_text()) if metrics_path.exists() else {},
                         history=history, train=ctx.done("train") or {}, cache=ctx.done("cache-teacher") or {},
                         wall_s=wall, out=ctx.out)


def run_all(params: str, base: list[str], variants: list[Variant], root: Path, *,
            stages: tuple[str, ...] = STAGES,
            log=print) -> dict[str, VariantResult]:  # type: ignore[no-untyped-def]
    """Validate every variant, build the shared base, run the variants in order."""
    configure_threads()
    cfgs = configs(params, base, variants)
    shared = shared_base(params, base, root)
    results = {}
    for i, v in enumerate(variants, 1):
        log(f"[{i}/{len(variants)}] {v.name}: {' '.join(v.overrides) or '(base)'}")
        results[v.name] = r = run_variant(shared, cfgs[v.name], v, root, stages)
        ppl = r.metrics.get("ppl_wikitext2")
        log(f"    {v.name}: ppl {ppl if ppl is None else round(ppl, 2)}, {r.wall_s:.0f} s")
    return results


def write_json(path: Path, obj: object) -> None:
    """Atomic JSON write (results files are read by the report while benchmarks may still run)."""
    from ast_core.atomic import atomic_write_json
    atomic_write_json(path, obj)


def stamp() -> dict:
    """When and on what a result was measured (every results file carries it)."""
    import os
    import platform
    import subprocess

    import torch
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
            "threads": torch.get_num_threads()}
