"""The five stages in order: the one code path the CLI, Prefect and DVC all use.

Every stage runs inside an MLflow stage run nested in a pipeline run
(:mod:`tasks.tracking`; ``AST_TRACKING=off`` disables it).
"""

from __future__ import annotations

import time
from typing import Callable

from . import cache_teacher, compile, evaluate, prepare, train, tracking
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
    if tracker is None:
        with tracking.pipeline_run(ctx, reuse=True, params_file=params_file) as own:
            return run_stage(ctx, stage, tracker=own)
    start = time.perf_counter()
    with tracker.stage(stage) as st:
        func = STAGE_FUNCS[stage]
        result = func(ctx, on_step=st.on_step) if stage == "train" else func(ctx)
        st.finish(result)
    log.info("%s: finished in %.1f s", stage, time.perf_counter() - start)
    return result


def run_all(ctx: RunContext, *, params_file: str | None = None) -> dict:
    """All five stages under one new parent run."""
    ctx.claim()
    result: dict = {}
    with tracking.pipeline_run(ctx, reuse=False, params_file=params_file) as tracker:
        for stage in STAGE_FUNCS:
            result = run_stage(ctx, stage, tracker=tracker)
    return result
