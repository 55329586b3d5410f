"""What a pipeline run records, whoever records it: params, lineage tags, metrics, files, plots.

Why apart from :mod:`tasks.tracking`: these decide *what* is worth comparing
across runs and where a run came from; tracking decides *how* it reaches
MLflow (batching, nesting, failure handling). Plots are written here even when
tracking is off, because DVC shows them too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, RunContext, hash_json
from .config import PipelineConfig

log = logging.getLogger("ast_pipeline.run_record")

MAX_PARAM_LEN = 6000      # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 8000        # MAX_TAG_VAL_LENGTH


def params_ref(path: str | Path | None) -> str | None:
    """The params file as a tag: repo-relative when inside the repo (stable across checkouts), else absolute."""
    if not path:
        return None
    p = Path(path).resolve()
    return p.relative_to(REPO_ROOT).as_posix() if p.is_relative_to(REPO_ROOT) else str(p)


def config_hash(cfg: PipelineConfig) -> str:
    """Same hash as ``RunContext.claim`` writes to ``run.json``."""
    return hash_json(cfg.model_dump(mode="json"))


def flat_params(cfg: PipelineConfig) -> dict[str, str]:
    """The validated config as ``section.key`` -> string (lists as JSON), cut to MLflow's length limit."""
    out = {}
    for key, value in cfg.flat().items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text[:MAX_PARAM_LEN]
    return out


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lineage_tags(ctx: RunContext, params_file: str | None) -> dict[str, str]:
    """Where the run came from, as far as it is known now (later stages add the data and cache hashes)."""
    tags = {"ast.config_hash": config_hash(ctx.cfg), "ast.run_dir": str(ctx.out), "ast.method": ctx.cfg.train.method}
    if params_file:
        tags["params_file"] = params_file
    if commit := git_commit():
        tags["git_commit"] = tags["mlflow.source.git.commit"] = commit
    for lock in dict.fromkeys((Path.cwd() / "dvc.lock", REPO_ROOT / "dvc.lock")):
        if lock.is_file():
            tags["dvc_lock_sha256"] = _sha256_file(lock)
            break
    prep = ctx.done("prepare")
    if prep and "manifest" in prep:
        tags["data_manifest_hash"] = str(prep["manifest"].get("hash"))
    cache = ctx.done("cache-teacher")
    if cache:
        fields = cache.get("fingerprint_fields")
        tags["teacher_cache_fingerprint"] = hash_json(fields) if fields else f"none ({cache.get('skipped', '?')})"
    return {k: v[:MAX_TAG_LEN] for k, v in tags.items()}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def stage_metrics(ctx: RunContext, stage: str, result: dict) -> dict[str, float]:
    """The numbers worth comparing across runs, from what the stage returned."""
    m: dict[str, Any] = {}
    if stage == "prepare":
        counts = result.get("counts", {})
        m = {"train_tokens": counts.get("train_tokens"), "train_blocks": counts.get("train_blocks")}
    elif stage == "cache-teacher":
        m = {"teacher_cache_bytes_per_token": result.get("bytes_per_token"),
             "teacher_cache_blocks": result.get("blocks")}
    elif stage == "train":
        m = {k: v for k, v in result.items() if k not in ("fingerprint", "resumed_from")}
    elif stage == "compile":
        comp = result.get("compressed", {})
        m = {"sparse_layers": result.get("sparse_layers"), "compressed_ratio": comp.get("sparse_linear_ratio"),
             "compressed_checkpoint_ratio": comp.get("checkpoint_ratio"),
             "compressed_file_bytes": comp.get("file_bytes")}
    elif stage == "evaluate":
        m = {k: result.get(k) for k in ("ppl_wikitext2", "ppl_wikitext2_dense", "ppl_wikitext2_trained",
                                         "ppl_wikitext2_base_only", "tokens_trained", "flip_rate_final",
                                         "compressed_ratio")}
        m["export_ppl_rel_diff"] = (result.get("export_check") or {}).get("ppl_rel_diff")
        for key in ("ppl_wikitext2_ci95", "ppl_wikitext2_dense_ci95"):
            lo_hi = result.get(key) or [None, None]
            m[f"{key}_lo"], m[f"{key}_hi"] = lo_hi[0], lo_hi[1]
        for prefix in ("zero_shot", "zero_shot_dense", "zero_shot_trained", "zero_shot_base_only"):
            scores = result.get(prefix) or {}
            m.update({f"{prefix}/{task}": acc for task, acc in scores.items()})
            if scores:
                m[f"{prefix}/mean"] = sum(scores.values()) / len(scores)
    return {k: f for k, v in m.items() if (f := _number(v)) is not None}


def stage_files(ctx: RunContext, stage: str) -> list[Path]:
    """Small files of a stage worth keeping beside the run (logged under their run-dir-relative path)."""
    rel = {
        "prepare": ["prepare/manifest.json"],
        "cache-teacher": ["cache_teacher/cache/fingerprint.json"],
        "train": ["train/history.jsonl", "train/final/meta.json"],
        "compile": ["compile/report.json", "export/hf/sparsity.json"],
        "evaluate": ["metrics.json", "metrics.md", "export/hf/README.md"],
    }[stage]
    return [ctx.out / r for r in rel if (ctx.out / r).is_file()]


def stage_result(ctx: RunContext, stage: str) -> dict:
    """What a finished stage returned, read back from its ``done.json`` (for logging a run afterwards)."""
    done = ctx.done(stage) or {}
    if stage == "prepare":
        return done.get("manifest", {})
    if stage == "evaluate":
        return done.get("metrics", {})
    return done


def stage_plots(ctx: RunContext, stage: str) -> list[Path]:
    """The plots :func:`write_plots` wrote for ``stage`` that are on disk."""
    from .plots import EVAL_PLOTS, TRAIN_PLOTS, VAL_PLOT
    names = {"train": (*TRAIN_PLOTS, VAL_PLOT), "evaluate": EVAL_PLOTS}.get(stage, ())
    return [p for name in names if (p := ctx.out / "plots" / name).is_file()]


def write_plots(ctx: RunContext, stage: str) -> list[Path]:
    """``DIR/plots/*.png`` after train and evaluate; a plotting error is a warning, never a failed stage."""
    from . import plots
    try:
        if stage == "train":
            return plots.training_plots(plots.read_history(ctx.stage_dir("train") / "history.jsonl"),
                                        ctx.out / "plots")
        if stage == "evaluate" and (ctx.out / "metrics.json").is_file():
            return plots.perplexity_plot(json.loads((ctx.out / "metrics.json").read_text()), ctx.out / "plots")
    except Exception as exc:  # noqa: BLE001 - plots are a by-product
        log.warning("plots for %s not written: %s", stage, exc)
    return []
