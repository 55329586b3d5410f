"""MLflow tracking: one parent run per pipeline run, a nested run per stage, and never a lost stage.

The slow test runs the tiny pipeline once through the CLI into a sqlite store
in tmp and reads it back with ``MlflowClient``; the fast ones run only the
``prepare`` stage (seconds) to check the switch, the failure path and how
separate stage calls (DVC) join one parent run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.cli import main
from tasks.common import STAGES

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "params" / "tiny.yaml")
PARENT = "mlflow.parentRunId"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = {"train_loss.png", "train_flip_rate.png", "train_schedule.png", "train_val_ppl.png", "ppl.png"}


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str = "tiny") -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _children(uri: str, parent_id: str) -> list:
    return [r for r in _runs(uri) if r.data.tags.get(PARENT) == parent_id]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.delenv("AST_TRACKING", raising=False)
        assert main(["run", "--params", TINY, "--out", str(out), "--no-progress"]) == 0
    runs = _runs(uri)
    parents = [r for r in runs if PARENT not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = {r.data.tags["ast.stage"]: r for r in runs if PARENT in r.data.tags}
    return SimpleNamespace(uri=uri, out=out, client=_client(uri), parent=parents[0], children=children,
                           child_runs=[r for r in runs if PARENT in r.data.tags])


@pytest.mark.slow
@pytest.mark.ci
def test_a_pipeline_run_is_one_parent_with_a_nested_run_per_stage(tracked: SimpleNamespace) -> None:
    pid = tracked.parent.info.run_id
    assert len(tracked.child_runs) == 5
    assert all(r.data.tags[PARENT] == pid for r in tracked.child_runs)
    assert set(tracked.children) == set(STAGES)
    assert {r.info.status for r in tracked.child_runs} == {"FINISHED"}
    assert tracked.client.get_run(pid).info.status == "FINISHED"
    exp = tracked.client.get_experiment(tracked.parent.info.experiment_id)
    assert exp.name == "tiny"
    # MLflow 3 opens an experiment without a kind on its GenAI overview; this kind opens the runs table
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    record = json.loads((tracked.out / "mlflow_run.json").read_text())
    assert record["run_id"] == pid and record["tracking_uri"] == tracked.uri


@pytest.mark.slow
def test_log_run_of_a_directory_a_live_run_logged_logs_nothing(tracked: SimpleNamespace, monkeypatch) -> None:
    from tasks.tracking import log_run_dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked.uri)
    assert log_run_dir(tracked.out) == (tracked.parent.info.run_id, False)
    assert len([r for r in _runs(tracked.uri) if PARENT not in r.data.tags]) == 1


@pytest.mark.slow
@pytest.mark.ci
def test_training_steps_are_logged_as_metric_histories(tracked: SimpleNamespace) -> None:
    train_id = tracked.children["train"].info.run_id
    history = [json.loads(line) for line in (tracked.out / "train" / "history.jsonl").read_text().splitlines()]
    loss = sorted(tracked.client.get_metric_history(train_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == list(range(1, 21))  # tiny preset: 20 steps, log_every 1
    assert [m.value for m in loss] == pytest.approx([h["loss"] for h in history if "loss" in h])  # step 0: val only
    flips = sorted(tracked.client.get_metric_history(train_id, "flip_rate_prev"), key=lambda m: m.step)
    assert [m.step for m in flips] == [5, 10, 15, 20]  # refresh_every 5
    for key in ("ce", "kl", "lr", "lam", "grad_norm", "tokens_per_s", "flip_rate_init", "pruned_kept_ratio"):
        assert tracked.client.get_metric_history(train_id, key), key


@pytest.mark.slow
@pytest.mark.ci
def test_params_hold_the_flattened_validated_config(tracked: SimpleNamespace) -> None:
    from tasks.config import load_config
    params = tracked.parent.data.params
    assert params["train.lambda_max"] == "0.002"
    assert params["name"] == "tiny" and params["evaluate.zero_shot.tasks"] == '["boolq", "piqa"]'
    assert set(params) == set(load_config(TINY).flat())


@pytest.mark.slow
@pytest.mark.ci
def test_final_metrics_and_stage_wall_times_reach_the_parent(tracked: SimpleNamespace) -> None:
    m = tracked.parent.data.metrics
    metrics = json.loads((tracked.out / "metrics.json").read_text())
    assert m["ppl_wikitext2"] == pytest.approx(metrics["ppl_wikitext2"])
    assert m["ppl_wikitext2_dense"] == pytest.approx(metrics["ppl_wikitext2_dense"])
    assert m["zero_shot/boolq"] == pytest.approx(metrics["zero_shot"]["boolq"]) and "zero_shot/piqa" in m
    assert m["ppl_wikitext2_trained"] == pytest.approx(metrics["ppl_wikitext2_trained"])
    assert m["ppl_wikitext2_base_only"] == pytest.approx(metrics["ppl_wikitext2_base_only"])
    assert m["export_ppl_rel_diff"] <= metrics["export_check"]["ppl_rtol"]
    assert m["tokens_trained"] == 20 * 4 * 64
    assert m["flip_rate_final"] == pytest.approx(metrics["flip_rate_final"])
    assert 0.5 < m["compressed_ratio"] < 0.57
    assert m["teacher_cache_bytes_per_token"] > 0
    assert all(m[f"wall_time_s/{s}"] > 0 for s in STAGES)
    assert tracked.children["evaluate"].data.metrics["ppl_wikitext2"] == pytest.approx(metrics["ppl_wikitext2"])


@pytest.mark.slow
@pytest.mark.ci
def test_lineage_tags_name_the_code_data_cache_and_params(tracked: SimpleNamespace) -> None:
    tags = tracked.parent.data.tags
    manifest = json.loads((tracked.out / "prepare" / "manifest.json").read_text())
    assert tags["data_manifest_hash"] == manifest["hash"]
    assert re.fullmatch(r"[0-9a-f]{16}", tags["teacher_cache_fingerprint"])
    assert tags["params_file"] == "params/tiny.yaml"
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
    if (Path.cwd() / "dvc.lock").is_file() or (REPO / "dvc.lock").is_file():
        assert re.fullmatch(r"[0-9a-f]{64}", tags["dvc_lock_sha256"])
    assert tracked.children["train"].data.tags["data_manifest_hash"] == manifest["hash"]


@pytest.mark.slow
@pytest.mark.ci
def test_plots_and_reports_are_logged_and_written_to_the_run_dir(tracked: SimpleNamespace, tmp_path: Path) -> None:
    client, pid = tracked.client, tracked.parent.info.run_id
    logged = {Path(a.path).name for a in client.list_artifacts(pid, "plots")}
    assert logged == PLOTS
    for name in PLOTS:
        local = Path(client.download_artifacts(pid, f"plots/{name}", str(tmp_path)))
        data = local.read_bytes()
        assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100
        assert (tracked.out / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    top = {a.path for a in client.list_artifacts(pid)}
    assert {"metrics.json", "metrics.md"} <= top
    assert {a.path for a in client.list_artifacts(pid, "compile")} >= {"compile/report.json"}
    assert {a.path for a in client.list_artifacts(pid, "export/hf")} == {"export/hf/sparsity.json",
                                                                         "export/hf/README.md"}
    train_plots = {Path(a.path).name for a in client.list_artifacts(tracked.children["train"].info.run_id, "plots")}
    assert train_plots == {"train_loss.png", "train_flip_rate.png", "train_schedule.png", "train_val_ppl.png"}
    val = client.get_metric_history(tracked.children["train"].info.run_id, "val_ppl")
    assert sorted(m.step for m in val) == [0, 5, 10, 15, 20]  # tiny: eval_every 5 of 20 steps, and the start
    assert all(1.0 < m.value < 1e6 for m in val)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the fast tests: creating its tables once costs seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlruns.db'}"
    _client(uri).search_experiments()
    return uri


@pytest.fixture
def tracking_env(monkeypatch: pytest.MonkeyPatch, store: str) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("AST_TRACKING", raising=False)
    return store


def _prepare(out: Path, *overrides: str) -> int:
    sets = [arg for ov in overrides for arg in ("--set", ov)]
    return main(["stage", "prepare", "--params", TINY, "--out", str(out), "--no-progress", *sets])


def test_tracking_off_logs_nothing_and_never_imports_mlflow(tmp_path: Path, monkeypatch, caplog) -> None:
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")] or ["mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)  # any `import mlflow...` now raises ImportError
    db, out = tmp_path / "mlruns.db", tmp_path / "run"
    monkeypatch.setenv("AST_TRACKING", "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    caplog.set_level("WARNING")
    assert _prepare(out) == 0
    assert (out / "prepare" / "done.json").exists()
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "tracking" in r.getMessage()]
    assert not db.exists() and not (out / "mlflow_run.json").exists()
    assert not (tmp_path / "mlartifacts").exists()


def test_a_broken_tracking_uri_only_warns_and_the_stage_completes(tmp_path: Path, monkeypatch, caplog) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the database directory should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlruns.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("AST_TRACKING", raising=False)
    caplog.set_level("WARNING")
    out = tmp_path / "run"
    assert _prepare(out) == 0
    assert (out / "prepare" / "done.json").exists()
    assert any(r.levelname == "WARNING" and "tracking" in r.getMessage() for r in caplog.records)
    assert not (out / "mlflow_run.json").exists()


def test_a_tracking_failure_mid_run_only_warns(tmp_path: Path, tracking_env: str, monkeypatch, caplog) -> None:
    from mlflow.tracking import MlflowClient

    def refuse(*args, **kwargs):
        raise OSError("artifact store is full")
    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    caplog.set_level("WARNING")
    out = tmp_path / "run"
    assert _prepare(out) == 0
    assert (out / "prepare" / "done.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("artifact store is full" in w for w in warnings)
    parent_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert [r.info.status for r in _children(tracking_env, parent_id)] == ["FINISHED"]


def test_stage_calls_join_the_recorded_parent_of_the_same_config(tmp_path: Path, tracking_env: str) -> None:
    out = tmp_path / "run"
    assert _prepare(out) == 0
    first = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert _prepare(out) == 0  # DVC-style: a second process, same config
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == first
    kids = _children(tracking_env, first)
    assert sorted(r.data.tags["ast.skipped"] for r in kids) == ["false", "true"]
    assert _client(tracking_env).get_run(first).data.tags["data_manifest_hash"]

    long_regex = "x" * 7000  # a param value over MLflow's 6000-character limit
    assert _prepare(out, f"sparsity.exclude=[{long_regex}]") == 0
    second = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    assert second != first and len(_children(tracking_env, second)) == 1
    assert len(_client(tracking_env).get_run(second).data.params["sparsity.exclude"]) == 6000


def test_experiments_are_tagged_as_model_training_and_a_users_kind_is_kept(tracking_env: str) -> None:
    from tasks.tracking import _experiment
    client = _client(tracking_env)
    old = client.create_experiment("made-before-the-tag")  # as earlier versions left them
    mine = client.create_experiment("genai-by-choice", tags={"mlflow.experimentKind": "genai_development"})
    assert _experiment(client, "made-before-the-tag", tracking_env) == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert _experiment(client, "genai-by-choice", tracking_env) == mine
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"
    new = _experiment(client, "fresh", tracking_env)
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_step_write_failing_in_the_background_warns_once_and_stops_logging_steps(tmp_path: Path, caplog) -> None:
    """Steps go to MLflow's asynchronous logging; a write that failed in its background thread is
    collected at the next step: one warning, no further step is sent, training goes on."""
    from tasks.tracking import MlflowStageRun, MlflowTracker

    class Outage:
        def wait(self) -> None:
            raise OSError("database is locked")

    class Client:
        def __init__(self) -> None:
            self.steps: list[int] = []

        def log_batch(self, run_id, metrics=(), synchronous=True, **kw):  # type: ignore[no-untyped-def]
            assert synchronous is False and run_id == "stage"
            self.steps += sorted({m.step for m in metrics})
            return Outage()

    ctx = SimpleNamespace(out=tmp_path, stage_dir=lambda stage: tmp_path / stage)
    client = Client()
    tracker = MlflowTracker(ctx, client, "exp", "parent", None)  # type: ignore[arg-type]
    run = MlflowStageRun(tracker, "train", "stage")
    caplog.set_level("WARNING")
    for n in range(1, 6):
        run.on_step(SimpleNamespace(as_dict=lambda n=n: {"step": n, "loss": 1.0 / n}))
    assert client.steps == [1]  # step 1 was sent; its failure, seen at step 2, stopped the rest
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "database is locked" in warnings[0] and "log-run" in warnings[0]
