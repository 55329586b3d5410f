"""One writer per run directory, checksummed artifacts, and logging a run to MLflow afterwards.

- Two processes racing for one run directory: the second exits 2 naming the
  holder (pid, host, command, since when); a ``--wait`` writer waits, and takes
  over cleanly once the holder is SIGKILLed (the kernel drops a flock with its
  process: no stale lock).
- One byte flipped in a teacher-cache shard, in the token blocks or in the
  trained model: the consuming stage exits 2 naming the file and how to
  rebuild it, ``verify-run`` finds it, and the producing stage rebuilds it.
- A run finished during a tracking outage is logged later with ``log-run`` and
  is then in MLflow (sqlite store in tmp) with its per-step metrics.

The stage runs use the tiny preset through the CLI's ``main`` (the code path
of the CLI, Prefect and DVC); the race needs real processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.cli import main
from tasks.common import STAGES
from tasks.runlock import LOCK_FILE, RunDirLocked, hold, read_holder

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "params" / "tiny.yaml")
# a short training, checkpoints after steps 2 and 4, no validation: seconds per stage
SMALL = ["--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=0"]


def _stage(stage: str, out: Path, *extra: str) -> int:
    return main(["stage", stage, "--params", TINY, "--out", str(out), "--no-progress", *SMALL, *extra])


def _flip_byte(path: Path, where: float = 0.75) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> Path:
    """prepare + cache-teacher on tiny (tracking off)."""
    out = tmp_path_factory.mktemp("cached") / "run"
    for stage in ("prepare", "cache-teacher"):
        assert _stage(stage, out) == 0, stage
    return out


@pytest.fixture
def run_copy(cached: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(cached, out)
    return out


# ----------------------------------------------------------------------------- checksums

def test_a_flipped_byte_in_a_teacher_cache_shard_is_refused_naming_the_file(run_copy: Path, capsys) -> None:
    shard = sorted((run_copy / "cache_teacher" / "cache").glob("shard_00000.*.npy"))[0]
    _flip_byte(shard)
    capsys.readouterr()
    assert _stage("train", run_copy) == 2
    line = _error_line(capsys)
    assert str(shard) in line and "fails its checksum" in line, line
    assert f"ast-pipeline stage cache-teacher --params ... --out {run_copy}" in line, line
    assert not (run_copy / "train" / "done.json").exists()

    assert main(["verify-run", str(run_copy)]) == 2
    out = capsys.readouterr().out
    assert "1 damaged" in out and str(shard) in out, out

    assert _stage("cache-teacher", run_copy) == 0  # the stage that wrote it notices and rebuilds it
    assert main(["verify-run", str(run_copy)]) == 0
    assert _stage("train", run_copy) == 0


def test_a_flipped_byte_in_the_token_blocks_is_refused_and_prepare_rebuilds_them(run_copy: Path, capsys) -> None:
    blocks = run_copy / "prepare" / "train.npy"
    original = blocks.read_bytes()
    _flip_byte(blocks)
    capsys.readouterr()
    assert _stage("train", run_copy) == 2
    line = _error_line(capsys)
    assert str(blocks) in line and "token blocks" in line and "stage prepare" in line, line
    assert _stage("prepare", run_copy) == 0
    assert blocks.read_bytes() == original  # rebuilt bitwise: nothing downstream is invalidated
    assert main(["verify-run", str(run_copy)]) == 0


def test_a_flipped_byte_in_the_trained_model_is_refused_and_train_resume_rewrites_it(
        run_copy: Path, capsys) -> None:
    assert _stage("train", run_copy) == 0
    model = run_copy / "train" / "final" / "model.safetensors"
    original = model.read_bytes()
    meta = json.loads((run_copy / "train" / "final" / "meta.json").read_text())
    import hashlib
    assert meta["sha256"]["model.safetensors"] == hashlib.sha256(original).hexdigest()
    _flip_byte(model)
    capsys.readouterr()
    assert _stage("compile", run_copy) == 2
    line = _error_line(capsys)
    assert str(model) in line and "trained model" in line and "stage train" in line and "--resume" in line, line
    assert _stage("train", run_copy, "--resume") == 0  # rewritten from the last checkpoint, no retraining
    assert model.read_bytes() == original
    assert _stage("compile", run_copy) == 0


def test_verify_run_lists_files_written_before_checksums_as_unchecked(run_copy: Path, capsys, caplog) -> None:
    """An old run directory (no recorded checksums) still works and verifies, saying what it could not check."""
    fp = run_copy / "cache_teacher" / "cache" / "fingerprint.json"
    meta = json.loads(fp.read_text())
    del meta["sha256"]
    fp.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["verify-run", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert "unchecked" in out and "shard_00000" in out, out
    caplog.set_level("WARNING")
    assert _stage("train", run_copy) == 0
    assert "records no checksums" in caplog.text


def test_verify_run_of_a_directory_that_is_no_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["verify-run", str(tmp_path)]) == 2
    assert "is not a run directory" in _error_line(capsys)


# ----------------------------------------------------------------------------- the writer lock

def test_the_lock_is_reentrant_released_empty_and_skipped_on_other_torchrun_ranks(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    out = tmp_path / "run"
    with hold(out, what="outer"):
        with hold(out, what="inner"):  # run_all holds it, then each stage takes it again
            assert read_holder(out)["pid"] == os.getpid()
        assert read_holder(out)["what"] == "outer"
    assert not (out / LOCK_FILE).exists()  # released cleanly: nothing left behind
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    other = tmp_path / "rank1"
    with hold(other):
        assert not (other / LOCK_FILE).exists()  # only rank 0 takes it


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tasks.cli", *args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", AST_TRACKING="off", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false")


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def test_two_writers_race_the_second_is_refused_and_a_waiter_takes_over_after_a_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # the holder: a whole run, made long enough that it is still running when the others arrive
    holder = subprocess.Popen(_cli("run", "--params", TINY, "--out", str(out), "--no-progress",
                                   "--set", "train.steps=3000", "--set", "train.checkpoint_every=1000"),
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiter = None
    try:
        _wait_for(lambda: (read_holder(out) or {}).get("pid") == holder.pid, 180, "lock held by the first run")
        assert holder.poll() is None

        second = subprocess.run(_cli("stage", "prepare", "--params", TINY, "--out", str(out), "--no-progress"),
                                cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        err = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr
        msg = err[0]
        assert f"{out} is being written by another process" in msg, msg
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg and "tasks.cli run --params" in msg, msg
        assert "since 20" in msg and "--wait" in msg, msg
        assert holder.poll() is None  # the refused writer disturbed nothing

        log = tmp_path / "waiter.log"
        with open(log, "wb") as fh:
            waiter = subprocess.Popen(_cli("stage", "prepare", "--params", TINY, "--out", str(out), "--no-progress",
                                           "--wait"), cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
        _wait_for(lambda: b"waiting for the other writer" in log.read_bytes(), 300, "waiting message")
        assert f"pid {holder.pid}".encode() in log.read_bytes()
        assert waiter.poll() is None

        os.kill(holder.pid, signal.SIGKILL)  # no finally, no atexit: only the kernel can release the lock
        assert holder.wait(timeout=60) == -signal.SIGKILL
        assert waiter.wait(timeout=300) == 0, log.read_text()
        assert b"is free; continuing" in log.read_bytes()
    finally:
        for p in (holder, waiter):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert not (out / LOCK_FILE).exists()  # the waiter released it cleanly
    assert (out / "prepare" / "done.json").exists()
    with hold(out, what="after"):  # free again: this process takes it at once
        assert read_holder(out)["pid"] == os.getpid()


def test_a_held_lock_refuses_a_writer_in_this_process_naming_the_holder(tmp_path: Path, capsys) -> None:
    """The CLI's error path: RunDirLocked is one line with exit 2."""
    out = tmp_path / "run"
    code = ("import sys, time; from tasks.runlock import hold\n"
            f"with hold({str(out)!r}, what='test holder'):\n    print('held', flush=True); time.sleep(120)\n")
    other = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(RunDirLocked, match=rf"pid {other.pid} on "):
            with hold(out):
                pass
        capsys.readouterr()
        assert _stage("prepare", out) == 2
        assert f"pid {other.pid}" in _error_line(capsys)
    finally:
        other.kill()
        other.wait()


# ----------------------------------------------------------------------------- log-run

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.ci
def test_a_run_untracked_during_an_outage_is_logged_later_with_its_per_step_metrics(
        tmp_path: Path, monkeypatch, caplog, capsys) -> None:
    out = tmp_path / "run"
    monkeypatch.delenv("AST_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens: an outage
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    caplog.set_level("WARNING")
    assert main(["run", "--params", TINY, "--out", str(out), "--no-progress"]) == 0
    assert "running untracked" in caplog.text and f"ast-pipeline log-run {out}" in caplog.text

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()
    assert main(["log-run", str(out)]) == 0
    assert "logged" in capsys.readouterr().out

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["ast.logged_late"] == "true"
    children = {r.data.tags["ast.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") ==
                parent.info.run_id}
    assert set(children) == set(STAGES)

    metrics = json.loads((out / "metrics.json").read_text())
    assert parent.data.metrics["ppl_wikitext2"] == pytest.approx(metrics["ppl_wikitext2"])
    assert parent.data.params["train.lambda_max"] == "0.002"
    run_json = json.loads((out / "run.json").read_text())
    assert parent.data.tags["git_commit"] == run_json["git_commit"]
    assert parent.data.tags["data_manifest_hash"]

    history = [json.loads(line) for line in (out / "train" / "history.jsonl").read_text().splitlines()]
    train_id = children["train"].info.run_id
    loss = sorted(client.get_metric_history(train_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [h["step"] for h in history if "loss" in h] == list(range(1, 21))
    assert [m.value for m in loss] == pytest.approx([h["loss"] for h in history if "loss" in h])
    val = sorted(client.get_metric_history(train_id, "val_ppl"), key=lambda m: m.step)
    assert [m.step for m in val] == [h["step"] for h in history if "val_ppl" in h]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/train_loss.png" in arts and "plots/ppl.png" in arts

    # a second log-run of the same directory finds the first and logs nothing; --force logs it again
    capsys.readouterr()
    assert main(["log-run", str(out)]) == 0
    assert f"already logged to MLflow as run {parent.info.run_id}" in capsys.readouterr().out

    def n_parents() -> int:
        return len([r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags])
    assert n_parents() == 1
    assert main(["log-run", str(out), "--force"]) == 0 and n_parents() == 2
