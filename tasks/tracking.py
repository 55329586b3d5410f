"""MLflow tracking of every pipeline run: a parent run per pipeline run, a nested run per stage.

The CLI, Prefect and DVC all go through :func:`tasks.pipeline.run_stage` /
``run_all``, which wrap each stage in :meth:`Tracker.stage`; so every way of
running the pipeline is tracked the same way:

- ``run_all`` opens a new parent run (experiment = the params ``name``) holding
  the flattened config as params; each stage is a nested child run.
- A single ``ast-pipeline stage X`` (DVC runs stages as separate processes)
  reuses the parent recorded in ``DIR/mlflow_run.json`` when it has the same
  config hash and tracking store, else opens a new parent and records it.
- Each training step goes to MLflow's own asynchronous logging
  (``log_batch(..., synchronous=False)``: a background thread writes it), so
  tracking costs the training loop next to nothing; MLflow's ``log_batch`` also
  splits what exceeds its per-request limits.
- Final metrics (perplexities, ``zero_shot/<task>``, tokens, flip rate,
  compressed ratio, cache bytes/token, ``wall_time_s/<stage>``), lineage tags
  (git commit, data manifest hash, teacher cache fingerprint, ``dvc.lock``
  sha256, params file) and artifacts (metrics.json/.md, sparsity reports,
  plots) go to the stage run and to the parent, so the parent row of the
  MLflow runs table is enough to compare pipeline runs. *What* is recorded is
  decided in :mod:`tasks.run_record`; this module decides how it reaches MLflow.

Store: ``MLFLOW_TRACKING_URI`` or, by default, ``sqlite:///<repo>/mlruns.db``
with artifacts in ``<repo>/mlartifacts`` (beside the database for any sqlite
URI). Browse with::

    mlflow ui --backend-store-uri sqlite:///mlruns.db --host 127.0.0.1 --port 5000

``AST_TRACKING=off`` disables tracking (mlflow is then never imported). A
tracking failure never costs work: it logs one warning and the pipeline goes
on untracked; ``ast-pipeline log-run DIR`` (:func:`log_run_dir`) later logs the
finished run directory (params, metrics, per-step histories, plots, lineage)
from its files, so an outage costs nothing but time. MLflow's own usage telemetry is off unless the user set
``MLFLOW_DISABLE_TELEMETRY`` (the pipeline is meant to run offline).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .common import REPO_ROOT, STAGES, RunContext, StageError
from .run_record import (config_hash, flat_params, lineage_tags, params_ref, stage_files, stage_metrics,
                         stage_plots, stage_result, write_plots)

if TYPE_CHECKING:
    from ast_core.train import StepLog

log = logging.getLogger("ast_pipeline.tracking")

ENV_SWITCH = "AST_TRACKING"
RECORD_FILE = "mlflow_run.json"
PARENT_TAG = "mlflow.parentRunId"


def enabled() -> bool:
    """Tracking is on unless ``AST_TRACKING`` is off/0/false/no."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "false", "no")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlruns.db'}"


def artifact_root(uri: str) -> Path | None:
    """``mlartifacts/`` beside a sqlite database: MLflow's own default (``./mlruns``) depends on the cwd."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        return None
    return Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"


def _done_stamp(ctx: RunContext, stage: str) -> int | None:
    p = ctx.stage_dir(stage) / "done.json"
    return p.stat().st_mtime_ns if p.exists() else None


@contextmanager
def _finish_with_status(finish: Callable[[str], None]) -> Iterator[None]:
    """Call ``finish`` with the MLflow run status the block ended in (FINISHED, KILLED, FAILED)."""
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        finish(status)


class StageRun:
    """What a stage reports to while it runs. This base tracks nothing (tracking off or broken)."""

    def __init__(self, ctx: RunContext, stage: str) -> None:
        self.ctx, self.stage = ctx, stage
        self.start = time.perf_counter()
        self.stamp = _done_stamp(ctx, stage)
        self.plots: list[Path] = []

    def on_step(self, step: "StepLog") -> None:
        """Training's per-step callback."""

    def finish(self, result: dict) -> None:
        """The stage returned ``result``: write the plots (tracked or not, DVC shows them)."""
        self.plots = write_plots(self.ctx, self.stage)

    @property
    def skipped(self) -> bool:
        """Its ``done.json`` was not rewritten: the stage was up to date."""
        return self.stamp is not None and self.stamp == _done_stamp(self.ctx, self.stage)


class Tracker:
    """A pipeline run as MLflow sees it. This base is the no-op used when tracking is off or broken."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def _stage_run(self, stage: str) -> StageRun:
        return StageRun(self.ctx, stage)

    @contextmanager
    def stage(self, stage: str) -> Iterator[StageRun]:
        run = self._stage_run(stage)
        with _finish_with_status(lambda status: self._end_stage(run, status)):
            yield run

    def _end_stage(self, run: StageRun, status: str) -> None:
        pass

    def close(self, status: str) -> None:
        pass


class MlflowStageRun(StageRun):
    def __init__(self, tracker: "MlflowTracker", stage: str, run_id: str | None) -> None:
        super().__init__(tracker.ctx, stage)
        self.tracker, self.run_id = tracker, run_id
        self.steps_logged: set[int] = set()
        self.in_flight: Any = None  # the RunOperations of the last step, written in the background

    def on_step(self, step: "StepLog") -> None:
        if self.run_id is None or self.tracker.broken:
            return
        try:
            from mlflow.entities import Metric
            # the previous step's write has long finished (a step takes longer than one small insert):
            # collecting it here turns an outage into one warning now, not one error per step until the end
            self.wait()
            if self.tracker.broken:
                return
            values = step.as_dict()
            n = int(values.pop("step"))
            ts = int(time.time() * 1000)
            self.in_flight = self.tracker.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), ts, n) for k, v in values.items()], synchronous=False)
            self.steps_logged.add(n)
        except Exception as exc:  # noqa: BLE001 - never stop training for tracking
            self.tracker.fail("logging a training step", exc)

    def wait(self) -> None:
        """Wait for the step being written in the background; its failure becomes the one warning."""
        ops, self.in_flight = self.in_flight, None
        if ops is not None:
            self.tracker.call("logging training steps", ops.wait, force=True)

    def _backfill_history(self) -> None:
        """Steps not seen live (a skipped stage, or steps before a --resume) come from history.jsonl."""
        from mlflow.entities import Metric

        from .plots import read_history
        ts = int(time.time() * 1000)
        missing = []
        for rec in read_history(self.ctx.stage_dir("train") / "history.jsonl"):
            n = int(rec["step"])
            if n not in self.steps_logged:
                missing.extend(Metric(k, float(v), ts, n) for k, v in rec.items() if k != "step")
                self.steps_logged.add(n)
        self.tracker.call("logging the training history", self.tracker.client.log_batch, self.run_id,
                          metrics=missing)

    def finish(self, result: dict) -> None:
        super().finish(result)
        if self.run_id is None or self.tracker.broken:
            return
        try:
            self._report(result)
        except Exception as exc:  # noqa: BLE001 - tracking must never fail a finished stage
            self.tracker.fail(f"reporting the {self.stage} stage", exc)

    def _report(self, result: dict, late: bool = False) -> None:
        """``late``: logged from the run directory afterwards (:func:`log_run_dir`): no wall time is known."""
        wall = time.perf_counter() - self.start
        t = self.tracker
        self.wait()
        if self.stage == "train":
            t.call("reading the training history", self._backfill_history)
        metrics = {**stage_metrics(self.ctx, self.stage, result), **({} if late else {"wall_time_s": wall})}
        t.log_metrics(self.run_id, metrics)
        t.log_metrics(t.parent_id, {(f"wall_time_s/{self.stage}" if k == "wall_time_s" else k): v
                                    for k, v in metrics.items()})
        tags = {**t.lineage(), **({} if late else {"ast.skipped": str(self.skipped).lower()})}
        t.log_tags(self.run_id, tags)
        t.log_tags(t.parent_id, {k: v for k, v in tags.items() if k != "ast.skipped"})
        for path in [*stage_files(self.ctx, self.stage), *self.plots]:
            for run_id in (self.run_id, t.parent_id):
                t.log_file(run_id, path)


class MlflowTracker(Tracker):
    """A parent MLflow run; every call goes through :meth:`call`, which turns a failure into one warning."""

    def __init__(self, ctx: RunContext, client: Any, experiment_id: str, parent_id: str,
                 params_file: str | None) -> None:
        super().__init__(ctx)
        self.client, self.experiment_id, self.parent_id = client, experiment_id, parent_id
        self.params_file = params_file
        self.broken = False
        self.git_commit: str | None = None  # log_run_dir: the commit the run recorded, not today's

    def lineage(self) -> dict[str, str]:
        tags = lineage_tags(self.ctx, self.params_file)
        if self.git_commit is not None:
            tags["git_commit"] = tags["mlflow.source.git.commit"] = self.git_commit
        return tags

    def fail(self, what: str, exc: BaseException) -> None:
        if not self.broken:
            log.warning("tracking: %s failed (%s: %s); continuing without MLflow for this run (log it "
                        "later with `ast-pipeline log-run %s`)", what, type(exc).__name__, exc, self.ctx.out)
        self.broken = True

    def call(self, what: str, fn: Any, *args: Any, force: bool = False, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` or None; after a failure only ``force`` calls (ending runs) are tried."""
        if self.broken and not force:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must never lose work
            self.fail(what, exc)
            return None

    # MlflowClient.log_batch splits into requests within the store's limits (100 params/tags, 1000 metrics)

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric
        ts = int(time.time() * 1000)
        self.call("logging metrics", self.client.log_batch, run_id,
                  metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])

    def log_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag
        self.call("logging tags", self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param
        self.call("logging params", self.client.log_batch, run_id,
                  params=[Param(k, v) for k, v in params.items()])

    def log_file(self, run_id: str, path: Path) -> None:
        rel = path.relative_to(self.ctx.out).parent.as_posix() if path.is_relative_to(self.ctx.out) else ""
        self.call(f"uploading {path.name}", self.client.log_artifact, run_id, str(path),
                  artifact_path=None if rel in ("", ".") else rel)

    def _stage_run(self, stage: str) -> StageRun:
        def start() -> str:
            tags = {PARENT_TAG: self.parent_id, "ast.stage": stage, **self.lineage()}
            return self.client.create_run(self.experiment_id, tags=tags, run_name=stage).info.run_id
        return MlflowStageRun(self, stage, self.call(f"starting the {stage} run", start))

    def _end_stage(self, run: StageRun, status: str) -> None:
        if isinstance(run, MlflowStageRun) and run.run_id:
            run.wait()  # an interrupted training keeps the steps it logged
            self.call(f"ending the {run.stage} run", self.client.set_terminated, run.run_id, status, force=True)

    def close(self, status: str) -> None:
        if not self.broken:  # what the run holds, so that `log-run` of the same directory finds it
            self.call("tagging the pipeline run", self.client.set_tag, self.parent_id, RUN_KEY_TAG, run_key(self.ctx))
        self.call("ending the pipeline run", self.client.set_terminated, self.parent_id, status, force=True)


RUN_KEY_TAG = "ast.run_key"
"""A logged run's content key (:func:`run_key`): ``log-run`` finds a directory logged before by it."""


def run_key(ctx: RunContext) -> str:
    """The fingerprints of the run's finished stages (each covers its inputs and settings): equal for two
    loggings of the same results, different once another stage has finished or one was re-run."""
    from .common import hash_json
    return hash_json({s: (ctx.done(s) or {}).get("fingerprint") for s in STAGES if ctx.done(s) is not None})


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""MLflow 3.x reads this tag to choose an experiment's page: without it the UI opens the GenAI
"Overview"; ``custom_model_development`` opens the runs table (model training)."""


def _experiment(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(uri)
        try:
            return client.create_experiment(name, artifact_location=(root / name).as_uri() if root else None,
                                            tags=EXPERIMENT_KIND)
        except Exception:  # noqa: BLE001 - created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        log.info("tracking: restoring the deleted MLflow experiment %r", name)
        client.restore_experiment(exp.experiment_id)
    for key, value in EXPERIMENT_KIND.items():  # experiments made before the tag; a user's own choice stays
        if key not in (exp.tags or {}):
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _read_record(ctx: RunContext) -> dict:
    try:
        return json.loads((ctx.out / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _reusable_parent(client: Any, record: dict, uri: str, experiment_id: str, cfg_hash: str) -> str | None:
    """The recorded parent run, if it is this config's, in this store, and still there."""
    if (record.get("config_hash"), record.get("tracking_uri"), record.get("experiment_id")) != \
            (cfg_hash, uri, experiment_id):
        return None
    try:
        run = client.get_run(record["run_id"])
    except Exception:  # noqa: BLE001 - deleted, or another store: start a new parent
        return None
    return run.info.run_id if run.info.lifecycle_stage == "active" else None


def _open(ctx: RunContext, reuse: bool, params_file: str | None) -> MlflowTracker:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    from ast_core.atomic import atomic_write_json
    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment(client, ctx.cfg.name, uri)
    cfg_hash = config_hash(ctx.cfg)
    parent_id = _reusable_parent(client, _read_record(ctx), uri, experiment_id, cfg_hash) if reuse else None
    if parent_id is not None:
        client.update_run(parent_id, status="RUNNING")
        tracker = MlflowTracker(ctx, client, experiment_id, parent_id, params_file)
    else:
        run = client.create_run(experiment_id, run_name=f"{ctx.cfg.name}-{ctx.cfg.train.method}-{cfg_hash[:6]}",
                                tags={"ast.kind": "pipeline"})
        tracker = MlflowTracker(ctx, client, experiment_id, run.info.run_id, params_file)
        tracker.log_params(run.info.run_id, flat_params(ctx.cfg))
        ctx.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(ctx.out / RECORD_FILE, {
            "run_id": run.info.run_id, "experiment_id": experiment_id, "experiment_name": ctx.cfg.name,
            "tracking_uri": uri, "config_hash": cfg_hash, "params_file": params_file})
    tracker.log_tags(tracker.parent_id, lineage_tags(ctx, params_file))
    log.info("tracking: MLflow run %s (experiment %r) in %s", tracker.parent_id, ctx.cfg.name, uri)
    return tracker


@contextmanager
def pipeline_run(ctx: RunContext, *, reuse: bool, params_file: str | None = None) -> Iterator[Tracker]:
    """The parent run around one or more stages; ``reuse`` continues the recorded one (single stages)."""
    tracker: Tracker = Tracker(ctx)
    params_file = params_ref(params_file)
    if enabled():
        try:
            tracker = _open(ctx, reuse, params_file)
        except Exception as exc:  # noqa: BLE001 - tracking must never lose work
            log.warning("tracking: MLflow unavailable at %s (%s: %s); running untracked: log it later with "
                        "`ast-pipeline log-run %s` (set %s=off to silence this)", tracking_uri(),
                        type(exc).__name__, exc, ctx.out, ENV_SWITCH)
    with _finish_with_status(tracker.close):
        yield tracker


def log_run_dir(out: Path, params_file: str | None = None, force: bool = False) -> tuple[str, bool]:
    """Log a run directory to MLflow after the fact; returns (the parent run's id, whether it is new).

    What a live run logs, read back from the directory: the validated config
    (``run.json``, or ``params_file`` for a run of single stages that wrote
    none) as params, each finished stage as a nested run with its metrics,
    files and plots, the training history as per-step metrics, and the lineage
    tags (the git commit ``run.json`` recorded; none when it recorded none).
    A reader: it takes no lock and writes nothing into the directory. The
    parent run is tagged ``ast.logged_late`` and with the directory's
    :func:`run_key`; when the experiment already holds a run with that key (a
    live run that did log, or an earlier ``log-run``), nothing is logged and its
    id is returned, unless ``force``. A failure exits 2 and can simply be retried.
    """
    from .config import load_config, parse_config
    out = Path(out).resolve()
    record = out / "run.json"
    try:
        run_json = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError) as exc:
        raise StageError(f"{record} is unreadable: {exc}") from None
    if run_json is not None and "config" in run_json:
        cfg = parse_config(run_json["config"], str(record))
    elif params_file:
        cfg = load_config(params_file)
    else:
        raise StageError(f"{out} holds no run.json (single stages, e.g. from DVC, write none): pass "
                         "--params params/NAME.yaml, the params it ran with")
    ctx = RunContext.create(cfg, out)
    stages = [s for s in STAGES if ctx.done(s) is not None]
    if not stages:
        raise StageError(f"{out} holds no finished stage (no */done.json): nothing to log")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient
    uri = tracking_uri()
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment_id = _experiment(client, cfg.name, uri)
        key = run_key(ctx)
        if not force:
            seen = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                      max_results=1)
            if seen:
                log.info("tracking: %s is already logged as MLflow run %s", out, seen[0].info.run_id)
                return seen[0].info.run_id, False
        run = client.create_run(experiment_id, run_name=f"{cfg.name}-{cfg.train.method}-{config_hash(cfg)[:6]}",
                                tags={"ast.kind": "pipeline", "ast.logged_late": "true"})
    except Exception as exc:  # noqa: BLE001 - any client/store failure: say where, and that a retry is safe
        raise StageError(f"MLflow at {uri} is unavailable ({type(exc).__name__}: {exc}); nothing was "
                         f"logged, try `ast-pipeline log-run {out}` again later") from None
    tracker = MlflowTracker(ctx, client, experiment_id, run.info.run_id, params_ref(params_file))
    tracker.git_commit = (run_json or {}).get("git_commit")
    tracker.log_params(tracker.parent_id, flat_params(cfg))
    tracker.log_tags(tracker.parent_id, {k: v for k, v in tracker.lineage().items()
                                         if tracker.git_commit or k not in ("git_commit", "mlflow.source.git.commit")})
    status = "FINISHED" if len(stages) == len(STAGES) else "FAILED"  # an unfinished run stays visibly so
    for stage in stages:
        with tracker.stage(stage) as st:
            st.plots = stage_plots(ctx, stage)
            if isinstance(st, MlflowStageRun) and st.run_id is not None and not tracker.broken:
                tracker.call(f"reporting the {stage} stage", st._report, stage_result(ctx, stage), late=True)
    tracker.close(status)
    if tracker.broken:
        raise StageError(f"logging {out} to MLflow at {uri} failed part-way (see the warning above); run "
                         f"`ast-pipeline log-run {out}` again (a new run; delete run {tracker.parent_id})")
    log.info("tracking: logged %s as MLflow run %s (experiment %r) in %s", out, tracker.parent_id, cfg.name, uri)
    return tracker.parent_id, True
