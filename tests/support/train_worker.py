"""A tiny AST training run that a test can SIGKILL at any moment, and resume.

Why a separate entry point: a crash test must kill a real process (no
``finally``, no ``atexit``), so training runs outside pytest. Importing torch
and transformers costs 10-20 s on a loaded 2-core machine, far too much to pay
once per kill, so the test starts one *zygote* that imports everything once and
then forks a fresh child per training run (a child of a process that never ran
a torch op, with one thread: safe to fork).

Protocol (``zygote`` mode), one line per message:

- stdin ``{"ckpt": DIR, "steps": N, "sleep": S}`` -> fork a child that trains
  with ``resume=True`` into ``DIR``; stdout ``spawned PID``.
- stdin ``wait PID`` -> stdout ``exit PID STATUS`` once that child is gone
  (``STATUS`` is ``-9`` for SIGKILL).
- the child writes markers to stdout: ``ready PID``, ``step PID N``,
  ``ckpt-begin PID N``, ``file PID NAME``, ``latest PID N``, ``ckpt-end PID N``,
  ``done PID`` or ``error PID MESSAGE``.

``S > 0`` sleeps after every checkpoint file and before the ``latest`` pointer
is replaced, so a random kill often lands inside a checkpoint write.

Manual use: ``python tests/support/train_worker.py run DIR [--steps N] [--sleep S]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ast_core.checkpoint as ckpt_mod  # noqa: E402
import ast_core.train as train_mod  # noqa: E402
from ast_core.models import _embedded_vocab_size  # noqa: E402
from tasks.config import TrainConfig  # noqa: E402
from tests.support import tiny  # noqa: E402

SEED = 0


def config(steps: int) -> TrainConfig:
    """ast-naive (adaptive mask + decay + KD), a checkpoint after every step."""
    return TrainConfig(method="ast-naive", steps=steps, batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                       lambda_max=1e-2, t0_steps=max(1, steps // 3), refresh_every=2, checkpoint_every=1,
                       log_every=1, refresh_score="magnitude")  # no calibration statistics here


def blocks() -> np.ndarray:
    return tiny.blocks(n=24)


def student() -> torch.nn.Module:
    return tiny.student(slorb=False, seed=SEED)


def _say(msg: str) -> None:
    """One unbuffered write: lines from a child are never lost or interleaved when it is killed."""
    os.write(1, (msg + "\n").encode())


def _install_hooks(sleep: float) -> None:
    """Markers around the checkpoint writes, and an optional sleep to widen them."""
    pid = os.getpid()
    real_save_file, real_atomic_text = ckpt_mod.save_file, ckpt_mod.atomic_write_text
    real_save_checkpoint = train_mod.save_checkpoint

    def save_file(tensors, filename, *a, **kw):
        _say(f"file {pid} {Path(filename).name}")
        real_save_file(tensors, filename, *a, **kw)
        if sleep:
            time.sleep(sleep)

    def atomic_write_text(path, text):
        if Path(path).name == ckpt_mod.LATEST:
            _say(f"latest {pid} {text.strip()}")
            if sleep:
                time.sleep(sleep)
        return real_atomic_text(path, text)

    def save_checkpoint(root, step, *a, **kw):
        _say(f"ckpt-begin {pid} {step}")
        out = real_save_checkpoint(root, step, *a, **kw)
        _say(f"ckpt-end {pid} {step}")
        return out

    ckpt_mod.save_file = save_file
    ckpt_mod.atomic_write_text = atomic_write_text
    train_mod.save_checkpoint = save_checkpoint


def train_once(ckpt: Path, steps: int, sleep: float) -> None:
    """One (resumable) run: the same model, data and teacher every time."""
    pid = os.getpid()
    _install_hooks(sleep)
    torch.manual_seed(SEED)
    model = student()
    teacher = train_mod.OnlineTeacher(tiny.teacher(seed=SEED + 1))
    _say(f"ready {pid}")
    train_mod.train(model, blocks(), config(steps), seed=SEED, teacher=teacher, checkpoint_dir=Path(ckpt),
                    resume=True, progress=False, on_step=lambda log: _say(f"step {pid} {log.step}"))
    _say(f"done {pid}")


def _child(job: dict) -> None:
    code = 0
    try:
        train_once(Path(job["ckpt"]), int(job["steps"]), float(job.get("sleep", 0.0)))
    except BaseException:  # noqa: BLE001 - reported to the test, then exit
        _say(f"error {os.getpid()} " + traceback.format_exc().replace("\n", " | "))
        code = 1
    os._exit(code)


def zygote() -> None:
    torch.set_num_threads(1)
    _embedded_vocab_size()  # warm the cache once: every child inherits it
    print("zygote ready", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line.startswith("wait "):
            pid = int(line.split()[1])
            _, status = os.waitpid(pid, 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(f"exit {pid} {code}", flush=True)
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(f"spawned {pid}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    sub.add_parser("zygote")
    r = sub.add_parser("run")
    r.add_argument("ckpt")
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.mode == "zygote":
        zygote()
    else:
        torch.set_num_threads(1)
        train_once(Path(args.ckpt), args.steps, args.sleep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
