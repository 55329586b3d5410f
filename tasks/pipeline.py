"""The five stages in order: the one code path the CLI, Prefect and DVC all use."""

from __future__ import annotations

from typing import Callable

from . import cache_teacher, compile, evaluate, prepare, train
from .common import RunContext

STAGE_FUNCS: dict[str, Callable[[RunContext], dict]] = {
    "prepare": prepare.run,
    "cache-teacher": cache_teacher.run,
    "train": train.run,
    "compile": compile.run,
    "evaluate": evaluate.run,
}


def run_stage(ctx: RunContext, stage: str) -> dict:
    return STAGE_FUNCS[stage](ctx)


def run_all(ctx: RunContext) -> dict:
    ctx.claim()
    result: dict = {}
    for stage in STAGE_FUNCS:
        result = run_stage(ctx, stage)
    return result
