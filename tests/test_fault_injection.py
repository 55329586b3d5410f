"""Training survives crashes, full disks and divergence without losing or tearing state.

- SIGKILL at random (seeded) moments, half of them inside a checkpoint write,
  resuming each time: the final weights, masks, optimizer state and per-step
  losses are bitwise those of an uninterrupted run, and after every kill
  ``latest`` points to a complete checkpoint.
- A checkpoint write that fails (disk full, permission denied) stops training
  with an error naming the checkpoint, the cause and the previous checkpoint,
  which stays intact and resumable.
- A NaN loss or gradient stops training, naming the step and the last good
  checkpoint; nothing non-finite is written.

The kills need a real process: ``tests/support/train_worker.py`` runs a zygote
that imports torch once and forks one training child per run.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import ast_core.checkpoint as ckpt_mod
from ast_core.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_tensors
from ast_core.sparse import sparse_layers
from ast_core.train import OnlineTeacher, TrainingDiverged, train
from support import tiny
from tasks.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "support" / "train_worker.py"
STEPS = 16          # of the killed run; a checkpoint after every step
SLEEP = 0.25        # seconds the worker sleeps after each checkpoint file and before `latest`
KILLS = 4
KILL_SEED = 20240607
# where the kills inside a checkpoint write land: after the step dir was renamed but before `latest`
# is replaced (the next run must redo that step over the orphan), and between two files
IN_WRITE_TARGETS = ("latest", "file")


# ----------------------------------------------------------------------------- the zygote

class Zygote:
    """Drives ``train_worker.py zygote``: spawn a training child, watch its markers, SIGKILL it."""

    def __init__(self, log_path: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self._stderr = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(WORKER), "zygote"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        self.events: dict[int, list[str]] = {}
        self.live: set[int] = set()  # spawned, not yet reaped: killed on close if a test failed mid-way
        threading.Thread(target=self._read, daemon=True).start()
        self._next("zygote ready", timeout=600)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("<eof>")

    def _next(self, prefix: str, timeout: float, pid: int | None = None) -> str:
        """Consume lines until one starts with ``prefix`` (and, for child markers, is from ``pid``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {prefix!r} within {timeout} s") from None
            if line == "<eof>":
                raise AssertionError(f"zygote died waiting for {prefix!r}")
            parts = line.split(" ", 2)
            if len(parts) > 1 and parts[1].isdigit() and parts[0] not in ("spawned", "exit"):
                self.events.setdefault(int(parts[1]), []).append(line)
                if parts[0] == "error":
                    raise AssertionError(f"training child failed: {line}")
            if line.startswith(prefix) and (pid is None or (len(parts) > 1 and parts[1] == str(pid))):
                return line

    def spawn(self, ckpt: Path, steps: int, sleep: float) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ckpt": str(ckpt), "steps": steps, "sleep": sleep}) + "\n")
        self.proc.stdin.flush()
        pid = int(self._next("spawned", timeout=60).split()[1])
        self.live.add(pid)
        return pid

    def expect(self, pid: int, marker: str, timeout: float = 120) -> str:
        return self._next(f"{marker} {pid}", timeout, pid)

    def wait(self, pid: int, timeout: float = 300) -> int:
        """Reap the child; all its markers have been read once this returns."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"wait {pid}\n")
        self.proc.stdin.flush()
        code = int(self._next(f"exit {pid}", timeout).split()[2])
        self.live.discard(pid)
        return code

    def close(self) -> None:
        for pid in self.live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._stderr.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.log")
    yield z
    z.close()


# ----------------------------------------------------------------------------- helpers

def _student() -> torch.nn.Module:
    return tiny.student(slorb=False)


def _assert_no_torn_checkpoint(root: Path, skeleton: torch.nn.Module) -> int:
    """``latest`` (if any) names a complete checkpoint that fits the model; every visible one is complete.

    A complete ``step_*`` newer than ``latest`` (or without any ``latest``) is legitimate: the kill came
    after its rename and before the pointer was replaced; the next run redoes that step.
    """
    for visible in root.glob("step_*") if root.exists() else []:
        load_checkpoint(visible)
    if not (root / "latest").exists():
        return 0
    path = latest_checkpoint(root)
    ck = load_checkpoint(path)
    assert ck.state["step"] == int(path.name.removeprefix("step_"))
    load_model_tensors(skeleton, ck.model, str(path))
    return ck.state["step"]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ----------------------------------------------------------------------------- SIGKILL

@pytest.mark.slow
@pytest.mark.ci
def test_sigkill_at_random_moments_then_resume_is_bitwise_identical(zygote: Zygote, tmp_path: Path) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    pid = zygote.spawn(reference, STEPS, sleep=0.0)
    assert zygote.wait(pid) == 0

    rng = random.Random(KILL_SEED)
    skeleton = _student()
    last_step, in_write = 0, 0
    for i in range(KILLS):
        pid = zygote.spawn(crashed, STEPS, SLEEP)
        zygote.expect(pid, "ready")
        if i % 2:  # inside a checkpoint write
            for _ in range(rng.randint(2, 3)):  # the first one completes: progress every time
                zygote.expect(pid, "ckpt-begin")
            zygote.expect(pid, IN_WRITE_TARGETS[(i // 2) % len(IN_WRITE_TARGETS)])
            time.sleep(rng.uniform(0.0, 0.6 * SLEEP))
        else:  # anywhere
            time.sleep(rng.uniform(0.05, 2.5))
        os.kill(pid, signal.SIGKILL)
        assert zygote.wait(pid) == -signal.SIGKILL, f"kill {i}: the run finished before it was killed"
        markers = [e.split()[0] for e in zygote.events[pid]]
        opened = max((j for j, m in enumerate(markers) if m == "ckpt-begin"), default=-1)
        in_write += opened >= 0 and "ckpt-end" not in markers[opened:]
        print(f"kill {i}: last marker {zygote.events[pid][-1]!r}")  # shown with -s: where it landed
        step = _assert_no_torn_checkpoint(crashed, skeleton)
        assert step >= last_step, f"kill {i}: latest went back from step {last_step} to {step}"
        last_step = step
    assert in_write >= KILLS // 2, f"only {in_write} of {KILLS} kills hit a checkpoint write"
    assert 0 < last_step < STEPS

    pid = zygote.spawn(crashed, STEPS, sleep=0.0)
    assert zygote.wait(pid) == 0
    first = next(int(e.split()[2]) for e in zygote.events[pid] if e.startswith("step "))
    assert first == last_step + 1  # it resumed where the last complete checkpoint left off

    final = f"step_{STEPS:06d}"
    a, b = load_checkpoint(reference / final), load_checkpoint(crashed / final)
    assert any(k.endswith(".mask") for k in a.model)
    _assert_same_tensors(a.model, b.model, "weights and masks")
    _assert_same_tensors(a.extra, b.extra, "initial masks and RNG state")
    assert a.optimizer["param_groups"] == b.optimizer["param_groups"]
    assert a.optimizer["state"].keys() == b.optimizer["state"].keys()
    for idx in a.optimizer["state"]:
        sa, sb = a.optimizer["state"][idx], b.optimizer["state"][idx]
        assert sa.keys() == sb.keys()
        for key in sa:
            same = torch.equal(sa[key], sb[key]) if torch.is_tensor(sa[key]) else sa[key] == sb[key]
            assert same, f"optimizer state {idx}.{key} differs"
    assert a.state["tokens"] == b.state["tokens"]
    ha, hb = a.state["history"], b.state["history"]
    assert [h["step"] for h in hb] == list(range(1, STEPS + 1))  # no step lost or repeated
    for key in ("loss", "ce", "kl", "grad_norm", "lr", "lam"):
        assert [h[key] for h in ha] == [h[key] for h in hb], key


# ----------------------------------------------------------------------------- write failures

# ``blocks``: tests/conftest.py's (16 × 16, seed 0)
@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return tiny.teacher(seed=1)


def _cfg(**kw) -> TrainConfig:
    base = dict(method="ast-naive", steps=3, batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                lambda_max=1e-2, t0_steps=2, refresh_every=2, checkpoint_every=1,
                refresh_score="magnitude")  # the students here have no calibration statistics
    base.update(kw)
    return TrainConfig(**base)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_in_save_file(monkeypatch, exc: BaseException) -> None:
    """The 2nd checkpoint's optim.safetensors fails, after its model.safetensors was written."""
    real, calls = ckpt_mod.save_file, {"n": 0}

    def save_file(tensors, filename, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return real(tensors, filename, *a, **kw)
    monkeypatch.setattr(ckpt_mod, "save_file", save_file)


def _fail_in_rename(monkeypatch, exc: BaseException) -> None:
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "step_000002":
            raise exc
        return real(src, dst, *a, **kw)
    monkeypatch.setattr(ckpt_mod.os, "replace", replace)


def _fail_in_latest(monkeypatch, exc: BaseException) -> None:
    real = ckpt_mod.atomic_write_text

    def atomic_write_text(path, text):
        if Path(path).name == "latest" and text.strip() == "step_000002":
            raise exc
        return real(path, text)
    monkeypatch.setattr(ckpt_mod, "atomic_write_text", atomic_write_text)


@pytest.mark.parametrize("inject, exc, reason", [
    (_fail_in_save_file, ENOSPC, "No space left on device"),
    # a real disk-full inside safetensors surfaces as SafetensorError, not OSError
    (_fail_in_save_file, SafetensorError("Error while serializing: I/O error: No space left on device "
                                         "(os error 28)"), "No space left on device"),
    (_fail_in_rename, ENOSPC, "No space left on device"),
    (_fail_in_latest, PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
], ids=["enospc-in-file", "safetensors-io-error", "enospc-in-rename", "eacces-on-latest"])
def test_failed_checkpoint_write_names_the_cause_and_keeps_the_previous_one(
        inject, exc, reason, monkeypatch, tmp_path: Path, blocks, teacher) -> None:
    inject(monkeypatch, exc)
    with pytest.raises(CheckpointError) as info:
        train(_student(), blocks, _cfg(), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
              progress=False)
    msg = str(info.value)
    assert "step_000002" in msg and reason in msg and "previous checkpoint step_000001" in msg, msg
    assert latest_checkpoint(tmp_path).name == "step_000001"
    assert load_checkpoint(tmp_path / "step_000001").state["step"] == 1
    assert not [p for p in tmp_path.glob(".step_*")], "a temporary checkpoint dir was left behind"
    for visible in tmp_path.glob("step_*"):
        load_checkpoint(visible)
    monkeypatch.undo()  # space freed: the run resumes from the intact checkpoint and finishes
    res = train(_student(), blocks, _cfg(), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
                resume=True, progress=False)
    assert res.resumed_from == 1 and res.steps == 3


# ----------------------------------------------------------------------------- divergence

DIVERGE = dict(steps=4, checkpoint_every=2)  # checkpoints after steps 2 and 4; step 4 diverges

def _poison_weights_after(step: int):
    """on_step callback: after ``step`` steps a weight becomes NaN, so the next loss is NaN."""
    def on_step(log) -> None:
        if log.step == step:
            with torch.no_grad():
                next(layer for _, layer in sparse_layers(model)).weight[0, 0] = float("nan")
    model = _student()
    return model, on_step


def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path: Path, blocks, teacher) -> None:
    model, on_step = _poison_weights_after(3)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step \d+; last good checkpoint: .*step_000002"):
        train(model, blocks, _cfg(**DIVERGE), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
              progress=False, on_step=on_step)
    assert latest_checkpoint(tmp_path).name == "step_000002" and not (tmp_path / "step_000004").exists()
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "step_000002").model.values())


def test_nan_gradient_with_finite_loss_stops_before_the_optimizer_step(tmp_path: Path, blocks, teacher) -> None:
    model = _student()
    layer = next(layer for _, layer in sparse_layers(model))
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == 4 else grad
    layer.weight.register_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"gradient norm is nan at step \d+; last good checkpoint: "
                                               r".*step_000002"):
        train(model, blocks, _cfg(**DIVERGE), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
              progress=False)
    assert torch.isfinite(layer.weight).all(), "the optimizer stepped with a NaN gradient"
    assert latest_checkpoint(tmp_path).name == "step_000002"


def test_divergence_message_numbers_steps_like_the_history(tmp_path: Path, blocks, teacher) -> None:
    model, on_step = _poison_weights_after(3)  # steps 1..3 logged fine, step 4 diverges
    with pytest.raises(TrainingDiverged, match=r"at step 4;"):
        train(model, blocks, _cfg(**DIVERGE), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
              progress=False, on_step=on_step)


# ----------------------------------------------------------------------------- a damaged latest checkpoint

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    """One bit flipped in the middle of the tensor data: safetensors still parses it; only a checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, file", [(_truncate, "optim.safetensors"), (_flip_byte, "model.safetensors")],
                         ids=["truncated-optim", "flipped-byte-in-weights"])
def test_damaged_latest_checkpoint_resumes_from_the_previous_intact_one_bitwise(
        damage, file, tmp_path: Path, blocks, teacher, caplog) -> None:
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    cfg = _cfg(steps=4, log_every=1)
    train(_student(), blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=reference, progress=False)
    first = train(_student(), blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=crashed,
                  progress=False, stop_after=3)
    assert first.steps == 3 and latest_checkpoint(crashed).name == "step_000003"
    damage(crashed / "step_000003" / file)

    caplog.set_level("WARNING")
    res = train(_student(), blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=crashed,
                resume=True, progress=False)
    assert res.resumed_from == 2 and res.steps == 4
    assert len(res.fell_back) == 1 and f"step_000003/{file}" in res.fell_back[0], res.fell_back
    said = caplog.text
    assert "falling back to step_000002 (step 2)" in said and f"step_000003/{file}" in said, said
    a, b = load_checkpoint(reference / "step_000004"), load_checkpoint(crashed / "step_000004")
    _assert_same_tensors(a.model, b.model, "weights and masks")
    _assert_same_tensors(a.extra, b.extra, "initial masks and RNG state")
    for idx in a.optimizer["state"]:
        for key, va in a.optimizer["state"][idx].items():
            vb = b.optimizer["state"][idx][key]
            assert torch.equal(va, vb) if torch.is_tensor(va) else va == vb, f"optimizer {idx}.{key}"
    assert [h["loss"] for h in a.state["history"]] == [h["loss"] for h in b.state["history"]]
    assert not (crashed / "step_000003").exists() or load_checkpoint(crashed / "step_000003")  # redone, intact


def test_no_intact_checkpoint_at_all_is_one_clear_error(tmp_path: Path, blocks, teacher) -> None:
    train(_student(), blocks, _cfg(steps=2), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
          progress=False)
    for step in ("step_000001", "step_000002"):
        _flip_byte(tmp_path / step / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint to resume from .*step_000002.*step_000001"
                                              r".*without --resume"):
        train(_student(), blocks, _cfg(steps=2), seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path,
              resume=True, progress=False)
