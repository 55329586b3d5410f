"""Prefect orchestration: the flows only compose the stages, and a real deployment runs.

The fast tests check the composition (stage order, config validated once,
which failures are retried, the comparison table, shared inputs) without a
Prefect server. The slow one starts a real Prefect server on a free loopback
port, deploys ``ast-pipeline/tiny`` from prefect.yaml, runs it with a process
worker and checks the flow run and its artifacts; everything it starts is
stopped, even when it fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from flows import ast_pipeline as ap
from flows import compare as cmp
from tasks.common import STAGES, RunContext
from tasks.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "params" / "tiny.yaml")
PREFECT = str(Path(sys.executable).with_name("prefect"))


# ----------------------------------------------------------------------------- flow composition

def test_flow_runs_the_five_stages_in_order_on_one_validated_config(tmp_path, monkeypatch) -> None:
    calls: list[tuple[str, int]] = []

    def fake_stage_task(ctx: RunContext, stage: str) -> dict:
        calls.append((stage, id(ctx.cfg)))
        return {"stage": stage}

    monkeypatch.setattr(ap, "run_stage_task", fake_stage_task)
    out = tmp_path / "run"
    result = ap.ast_pipeline.fn(params=TINY, out=str(out), overrides=["train.steps=7"])
    assert [s for s, _ in calls] == list(STAGES)
    assert len({cfg_id for _, cfg_id in calls}) == 1  # one config object, loaded once
    assert result == {"stage": "evaluate"}
    claimed = json.loads((out / "run.json").read_text())
    assert claimed["config"]["train"]["steps"] == 7


def test_the_flow_holds_the_run_directory_lock_from_first_stage_to_last(tmp_path, monkeypatch) -> None:
    import os

    from tasks.runlock import LOCK_FILE, read_holder
    out = tmp_path / "run"
    holders: list[dict | None] = []
    monkeypatch.setattr(ap, "run_stage_task", lambda ctx, stage: holders.append(read_holder(out)) or {})
    ap.ast_pipeline.fn(params=TINY, out=str(out))
    assert len(holders) == len(STAGES)
    assert all(h and h["pid"] == os.getpid() and h["what"] == "prefect flow ast-pipeline" for h in holders)
    assert not (out / LOCK_FILE).exists()  # released when the flow ended


def test_stage_tasks_call_the_one_pipeline_code_path(tmp_path, monkeypatch) -> None:
    import tasks.pipeline
    seen: list[str] = []
    monkeypatch.setattr(tasks.pipeline, "run_stage", lambda ctx, stage: seen.append(stage) or {"ok": stage})
    ctx = RunContext.create(load_config(TINY), tmp_path)
    assert ap.STAGE_TASKS["compile"].fn(ctx, "compile") == {"ok": "compile"}
    assert seen == ["compile"]


def test_a_bad_override_fails_before_any_stage_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ap, "run_stage_task", lambda ctx, stage: pytest.fail("a stage ran"))
    with pytest.raises(ConfigError, match="train.lr"):
        ap.ast_pipeline.fn(params=TINY, out=str(tmp_path / "x"), overrides=["train.lr=-1"])
    assert not (tmp_path / "x").exists()


def test_training_is_never_retried_and_prepare_is() -> None:
    assert ap.STAGE_TASKS["train"].retries == 0
    assert ap.STAGE_TASKS["prepare"].retries == 2
    assert all(t.persist_result is False for t in ap.STAGE_TASKS.values())


def test_only_failures_a_second_attempt_might_not_repeat_are_retried() -> None:
    from ast_core.data import DataSourceError
    from ast_core.train import TrainingDiverged
    from tasks.common import StageError

    assert ap.is_retryable(ConnectionError("hub reset the connection"))
    assert ap.is_retryable(OSError("disk busy"))
    assert not ap.is_retryable(TrainingDiverged("loss is nan"))
    assert not ap.is_retryable(StageError("stage 'prepare' has not completed"))
    assert not ap.is_retryable(DataSourceError("local data path not found: x"))
    try:
        try:
            raise ConnectionError("hub down")
        except ConnectionError as inner:
            raise DataSourceError("could not load data source 'c4' from the hub") from inner
    except DataSourceError as wrapped:
        assert ap.is_retryable(wrapped)


# ----------------------------------------------------------------------------- compare

def _metrics(ppl: float, zs: dict[str, float] | None = None, tokens: int = 0) -> dict:
    return {"ppl_wikitext2": ppl, "ppl_wikitext2_dense": 10.0, "zero_shot": zs or {}, "tokens_trained": tokens}


RESULTS = {  # deliberately not in METHODS order
    "ast-boosted": _metrics(12.0, {"boolq": 0.6, "piqa": 0.7}, tokens=5120),
    "oneshot-sparsegpt": _metrics(20.0, {"boolq": 0.5, "piqa": 0.6}),
    "dense": _metrics(10.0, {"boolq": 0.7, "piqa": 0.8}),
    "oneshot-wanda": _metrics(25.0),
}


def test_comparison_rows_measure_the_gap_closed_between_sparsegpt_and_dense() -> None:
    rows = {r["method"]: r for r in cmp.comparison_rows(RESULTS)}
    assert [r["method"] for r in cmp.comparison_rows(RESULTS)] == [
        "dense", "oneshot-wanda", "oneshot-sparsegpt", "ast-boosted"]
    assert rows["ast-boosted"]["gap_closed"] == pytest.approx(0.8)  # (20 - 12) / (20 - 10)
    assert rows["dense"]["gap_closed"] == pytest.approx(1.0)
    assert rows["oneshot-sparsegpt"]["gap_closed"] == pytest.approx(0.0)
    assert rows["oneshot-wanda"]["gap_closed"] == pytest.approx(-0.5)
    assert rows["ast-boosted"]["zero_shot_mean"] == pytest.approx(0.65)
    assert rows["oneshot-wanda"]["zero_shot_mean"] is None
    assert rows["ast-boosted"]["tokens"] == 5120


def test_comparison_table_is_markdown_with_one_row_per_method() -> None:
    md = cmp.comparison_table(RESULTS)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| method | WikiText-2 ppl | gap closed vs SparseGPT")
    assert len(lines) == 2 + len(RESULTS)
    assert "| ast-boosted | 12.00 | 80.0% | 0.6500 | 5,120 |" in lines
    assert "| oneshot-wanda | 25.00 | -50.0% | n/a | 0 |" in lines


def test_gap_closed_is_not_invented_without_a_sparsegpt_reference() -> None:
    rows = cmp.comparison_rows({"dense": _metrics(10.0), "naive": _metrics(14.0)})
    assert all(r["gap_closed"] is None for r in rows)
    assert "n/a" in cmp.comparison_table({"naive": _metrics(14.0)})


def test_write_comparison_writes_markdown_json_and_a_png(tmp_path) -> None:
    report = cmp.write_comparison(tmp_path, RESULTS, {"naive": "Failed: loss is nan"})
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(report))
    assert report["failed"] == {"naive": "Failed: loss is nan"}
    assert "naive (Failed: loss is nan)" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_share_prepare_and_cache_without_sharing_their_markers(tmp_path) -> None:
    cfg = load_config(TINY)
    shared = RunContext.create(cfg, tmp_path / "shared")
    for name, text in (("train.npy", "tokens"), ("done.json", '{"fingerprint": "abc"}')):
        (shared.stage_dir("prepare") / name).parent.mkdir(parents=True, exist_ok=True)
        (shared.stage_dir("prepare") / name).write_text(text)
    (shared.stage_dir("cache-teacher") / "cache").mkdir(parents=True)
    (shared.stage_dir("cache-teacher") / "cache" / "shard.npy").write_text("targets")
    method = RunContext.create(load_config(TINY, ["train.method=naive"]), tmp_path / "naive")
    from tasks.shared import link_shared  # what the compare flow's open_variant links with
    link_shared(shared, method)
    link_shared(shared, method)  # idempotent: a re-run of compare links nothing twice

    train = method.stage_dir("prepare") / "train.npy"
    assert train.is_symlink() and not os.path.isabs(os.readlink(train)) and train.read_text() == "tokens"
    assert (method.stage_dir("cache-teacher") / "cache" / "shard.npy").read_text() == "targets"
    assert method.done("prepare") == {"fingerprint": "abc"}
    method.mark_done("cache-teacher", "skipped:x")  # a method without a teacher marks its own dir only
    assert not (shared.stage_dir("cache-teacher") / "done.json").exists()
    method.mark_done("prepare", "other")  # an atomic write replaces the link, never the shared file
    assert shared.done("prepare") == {"fingerprint": "abc"}


def test_compare_refuses_an_unknown_method_before_any_work(tmp_path) -> None:
    with pytest.raises(ConfigError, match="train.method"):
        cmp.method_configs(TINY, [], ["dense", "magic"])


# ----------------------------------------------------------------------------- a real deployment

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _process_group(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group; on exit stop that group (SIGINT, then SIGKILL)."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            yield proc
        finally:
            for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace
                while time.monotonic() < deadline:
                    try:
                        os.killpg(proc.pid, 0)
                    except ProcessLookupError:
                        break
                    proc.poll()
                    time.sleep(0.2)
            proc.wait(timeout=10)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_healthy(api: str, server: subprocess.Popen, log: Path, timeout_s: float = 150) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited:\n{log.read_text()[-3000:]}"
        try:
            _get_json(f"{api}/health")
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


def _prefect(args: list[str], env: dict[str, str], timeout_s: float = 240) -> str:
    done = subprocess.run([PREFECT, "--no-prompt", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory) -> Iterator[tuple[str, dict[str, str], Path]]:
    """A real Prefect server on a free loopback port, its own home and database; stopped afterwards."""
    tmp = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ,
           "PREFECT_HOME": str(tmp / "prefect-home"),
           "PREFECT_API_URL": api,
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_UI_ENABLED": "false",
           "AST_TRACKING": "off", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlruns.db'}",
           "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PREFECT_PROFILE", None)
    log = tmp / "server.log"
    with _process_group([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                        env, log) as server:
        _wait_healthy(api, server, log)
        yield api, env, tmp


@pytest.mark.slow
@pytest.mark.ci
def test_tiny_deployment_runs_to_completion_on_a_process_worker(prefect_server) -> None:
    api, env, tmp = prefect_server
    out = tmp / "run"
    # a smaller budget than the preset: this checks the orchestration, test_pipeline checks the stages
    overrides = ["train.steps=2", "train.warmup_steps=0", "train.checkpoint_every=2", "data.max_train_blocks=8",
                 "evaluate.max_windows=1", "evaluate.zero_shot.enabled=false"]
    _prefect(["work-pool", "create", "ast-local", "--type", "process"], env)
    _prefect(["deploy", "--name", "tiny", "--params", json.dumps({"out": str(out), "overrides": overrides})], env)
    started = _prefect(["deployment", "run", "ast-pipeline/tiny"], env, timeout_s=120)
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
    worker_log = tmp / "worker.log"
    with _process_group([PREFECT, "worker", "start", "--pool", "ast-local", "--run-once"], env,
                        worker_log) as worker:
        try:
            worker.wait(timeout=400)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker still running after 400 s:\n{worker_log.read_text()[-3000:]}")
    run = _get_json(f"{api}/flow_runs/{flow_run_id}")
    assert run["state"]["type"] == "COMPLETED", worker_log.read_text()[-5000:]
    assert run["parameters"]["out"] == str(out)
    task_runs = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{api}/task_runs/filter", data=json.dumps({"flow_runs": {"id": {"any_": [flow_run_id]}}}).encode(),
        headers={"Content-Type": "application/json"}), timeout=10).read())
    assert sorted(t["name"] for t in task_runs if t["state"]["type"] == "COMPLETED") == sorted(STAGES)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "ast-boosted" and metrics["tokens_trained"] == 2 * 4 * 64
    assert (out / "export" / "hf" / "config.json").exists()
    assert (out / "export" / "hf" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_prefect_retries_a_flaky_prepare_but_never_a_diverged_training(prefect_server, tmp_path,
                                                                      monkeypatch) -> None:
    """Through Prefect's own retry machinery (against the real server), not just the predicate."""
    import tasks.pipeline
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from ast_core.train import TrainingDiverged

    api, env, _ = prefect_server
    attempts = {"prepare": 0, "train": 0}

    def flaky(ctx: RunContext, stage: str) -> dict:
        attempts[stage] += 1
        if stage == "prepare" and attempts[stage] < 3:
            raise ConnectionError("the hub reset the connection")
        if stage == "train":
            raise TrainingDiverged("loss is nan at step 3")
        return {"stage": stage}

    monkeypatch.setattr(tasks.pipeline, "run_stage", flaky)
    prepare, train = (ap.STAGE_TASKS[s].with_options(retry_delay_seconds=0) for s in ("prepare", "train"))
    ctx = RunContext.create(load_config(TINY), tmp_path / "run")

    @flow(name="retry-probe", persist_result=False)
    def probe() -> None:
        prepare(ctx, "prepare")
        train(ctx, "train")

    with temporary_settings({PREFECT_API_URL: api, PREFECT_HOME: env["PREFECT_HOME"]}):
        state = probe(return_state=True)
    assert state.is_failed()
    assert attempts == {"prepare": 3, "train": 1}


def test_open_variant_claims_its_directory_and_links_the_shared_base(tmp_path) -> None:
    """The compare flow and the benchmarks open a method's directory the same way (tasks.shared)."""
    from tasks.shared import open_variant
    cfg = load_config(TINY)
    shared = RunContext.create(cfg, tmp_path / "shared")
    (shared.stage_dir("prepare")).mkdir(parents=True)
    (shared.stage_dir("prepare") / "train.npy").write_text("tokens")
    ctx = open_variant(shared, load_config(TINY, ["train.method=naive"]), tmp_path, "naive")
    assert json.loads((ctx.out / "run.json").read_text())["config"]["train"]["method"] == "naive"
    assert (ctx.stage_dir("prepare") / "train.npy").is_symlink()
    assert not (ctx.out / "run.lock").exists()  # the lock is released (and its file removed) after claiming
