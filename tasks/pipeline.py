"""The five stages in order: the one code path the CLI, Prefect and DVC all use."""

from __future__ import annotations

import time
from typing import Callable

from . import cache_teacher, compile, evaluate, prepare, train
from .common import RunContext, log

STAGE_FUNCS: dict[str, Callable[[RunContext], dict]] = {
    "prepare": prepare.run,
    "cache-teacher": cache_teacher.run,
    "train": train.run,
    "compile": compile.run,
    "evaluate": evaluate.run,
}


def run_stage(ctx: RunContext, stage: str) -> dict:
    start = time.perf_counter()
    result = STAGE_FUNCS[stage](ctx)
    log.info("%s: finished in %.1f s", stage, time.perf_counter() - start)
    return result


def run_all(ctx: RunContext) -> dict:
    ctx.claim()
    result: dict = {}
    for stage in STAGE_FUNCS:
        result = run_stage(ctx, stage)
    return result
