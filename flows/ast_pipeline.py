"""The ``ast-pipeline`` Prefect flow: the five stages as Prefect tasks, nothing more.

Each task calls ``tasks.pipeline.run_stage(ctx, stage)``, the same function the
CLI and DVC call, so Prefect adds scheduling, retries and a UI but no second
implementation.

Caching: Prefect-level result caching is deliberately off (``NO_CACHE``,
``persist_result=False``). A stage already skips itself when the fingerprint of
its inputs matches its ``done.json``, and that check reads the artifacts on
disk. A Prefect cache key cannot see the disk: it would report a stage as done
after its run directory was deleted, or on a worker that lacks the files, and it
would need the results pickled into Prefect's result storage. The stage's own
check is a JSON read, so re-running a finished flow takes seconds and redoes
nothing.

Retries: only where a retry can help. ``prepare`` (a hub download may fail
transiently) gets 2, ``cache-teacher`` and ``evaluate`` (which may read the
teacher / zero-shot data from the hub) get 1; ``train`` and ``compile`` get none:
a diverged training run or a mask that is not N:M fails the same way the second
time, and a retry of training would only waste its compute. Errors the project
raises for bad inputs (config, missing stage, cache mismatch, ...) are never
retried, except a data-source error caused by a hub failure.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

from prefect import Task, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from tasks.common import STAGES, RunContext, configure_threads
from tasks.config import load_config

StageRunner = Callable[[RunContext, str], dict]
RETRIES: dict[str, int] = {"prepare": 2, "cache-teacher": 1, "train": 0, "compile": 0, "evaluate": 1}
RETRY_DELAY_S = 10


def _deterministic_errors() -> tuple[type[BaseException], ...]:
    """Errors that name a bad input: running the stage again cannot change the outcome."""
    from ast_core.errors import ASTError
    return (ASTError,)


def is_retryable(exc: BaseException | None) -> bool:
    """True for failures a second attempt might not repeat (I/O, network, hub errors)."""
    if exc is None:
        return True
    from ast_core.data import DataSourceError
    if isinstance(exc, DataSourceError):
        return exc.__cause__ is not None  # the hub failed underneath; a plain bad source does not
    return not isinstance(exc, _deterministic_errors())


def _retry_condition(task_: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect's ``retry_condition_fn``: the failed state carries the raised exception."""
    exc = state.data if isinstance(state.data, BaseException) else None
    return is_retryable(exc)


def _run_stage(ctx: RunContext, stage: str) -> dict:
    from tasks import pipeline  # lazy: the stage modules import transformers; `prefect deploy` need not
    return pipeline.run_stage(ctx, stage)  # looked up at call time: tests may replace it


STAGE_TASKS: dict[str, Task] = {
    stage: task(_run_stage, name=stage, task_run_name=stage, retries=RETRIES[stage],
                retry_delay_seconds=RETRY_DELAY_S if RETRIES[stage] else 0,
                retry_condition_fn=_retry_condition, cache_policy=NO_CACHE, persist_result=False)
    for stage in STAGES
}


def run_stage_task(ctx: RunContext, stage: str) -> dict:
    """Run one stage as its Prefect task (inside a flow run)."""
    return STAGE_TASKS[stage](ctx, stage)


def make_context(params: str, out: str | None = None, overrides: list[str] | None = None,
                 resume: bool = False, wait: bool = False) -> RunContext:
    """Load and validate the config once, before any work (the flow claims the directory under its lock)."""
    cfg = load_config(params, overrides)
    return RunContext.create(cfg, out, resume=resume, progress=False, wait=wait)  # no tqdm bars in Prefect logs


def run_stages(ctx: RunContext, runner: StageRunner, stages: Iterable[str] = STAGES) -> dict:
    """Run ``stages`` in pipeline order; returns the last stage's result (the metrics)."""
    wanted = set(stages)
    if wanted - set(STAGES):
        raise ValueError(f"unknown stage(s) {sorted(wanted - set(STAGES))}; stages: {list(STAGES)}")
    order = [s for s in STAGES if s in wanted]
    result: dict = {}
    for stage in order:
        result = runner(ctx, stage)
    return result


@flow(name="ast-pipeline", log_prints=True, persist_result=False)
def ast_pipeline(params: str = "params/tiny.yaml", out: str | None = None,
                 overrides: list[str] | None = None, resume: bool = False, wait: bool = False) -> dict:
    """prepare -> cache-teacher -> train -> compile -> evaluate for one params file.

    ``out`` defaults to ``artifacts/<params name>/``; ``overrides`` are
    ``section.key=value`` strings (the CLI's ``--set``); ``resume`` continues an
    interrupted training from its last checkpoint. The flow holds the run
    directory's writer lock from start to end (:mod:`tasks.runlock`): a second
    flow run on the same ``out`` fails naming this one, or with ``wait`` waits.
    """
    from tasks import runlock
    logging.getLogger("ast_pipeline").setLevel(logging.INFO)  # stage progress reaches the run's logs
    configure_threads()
    ctx = make_context(params, out, overrides, resume, wait)
    with runlock.hold(ctx.out, wait=wait, what="prefect flow ast-pipeline"):
        ctx.claim()
        metrics = run_stages(ctx, run_stage_task)
    print(f"done: {ctx.out / 'metrics.json'}")
    return metrics


if __name__ == "__main__":
    ast_pipeline()
