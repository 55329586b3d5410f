"""The five stages in order: the one code path the CLI, Prefect and DVC all use.

Every stage runs inside an MLflow stage run nested in a pipeline run
(:mod:`tasks.tracking`; ``AST_TRACKING=off`` disables it), while this process
holds the run directory's writer lock (:mod:`tasks.runlock`), and checks the
checksums of what it reads once per stage run (:mod:`ast_core.integrity`).
"""

from __future__ import annotations

import time
from typing import Callable

from ast_core.integrity import forget_verified

from . import cache_teacher, compile, evaluate, prepare, runlock, train, tracking
from .common import RunContext, log

STAGE_FUNCS: dict[str, Callable[[RunContext], dict]] = {
    "prepare": prepare.run,
    "cache-teacher": cache_teacher.run,
    "train": train.run,
    "compile": compile.run,
    "evaluate": evaluate.run,
}


def run_stage(ctx: RunContext, stage: str, *, tracker: tracking.Tracker | None = None,
              params_file: str | None = None) -> dict:
    """Run one stage; without ``tracker`` it joins the parent run recorded in the run directory."""
    with runlock.hold(ctx.out, wait=ctx.wait, what=f"stage {stage}"):
        if tracker is None:
            with tracking.pipeline_run(ctx, reuse=True, params_file=params_file) as own:
                return _run_stage(ctx, stage, own)
        return _run_stage(ctx, stage, tracker)


def _run_stage(ctx: RunContext, stage: str, tracker: tracking.Tracker) -> dict:
    forget_verified()  # each stage run checks the checksums of what it reads once
    start = time.perf_counter()
    with tracker.stage(stage) as st:
        func = STAGE_FUNCS[stage]
        result = func(ctx, on_step=st.on_step) if stage == "train" else func(ctx)
        st.finish(result)
    log.info("%s: finished in %.1f s", stage, time.perf_counter() - start)
    return result


def run_all(ctx: RunContext, *, params_file: str | None = None) -> dict:
    """All five stages under one new parent run, holding the run directory's lock throughout."""
    with runlock.hold(ctx.out, wait=ctx.wait, what="run"):
        ctx.claim()
        result: dict = {}
        with tracking.pipeline_run(ctx, reuse=False, params_file=params_file) as tracker:
            for stage in STAGE_FUNCS:
                result = run_stage(ctx, stage, tracker=tracker)
    return result
