"""One writer per run directory: an exclusive ``fcntl.flock`` on ``DIR/run.lock``.

Why: two processes writing one run directory (the CLI started twice, a Prefect
deployment triggered twice with the same ``out``, ``dvc repro`` and the CLI on
``artifacts/<preset>``) each keep every file whole (atomic renames) but not the
run: what one read, the other may have replaced. So every writer goes through
:func:`hold`, called by ``tasks.pipeline.run_stage`` / ``run_all`` (the one code
path of the CLI, Prefect and DVC) and by the Prefect flow around the whole run.

- The lock is ``flock(LOCK_EX)`` on ``DIR/run.lock``. The kernel drops it when
  the holder's file is closed, which includes any death, SIGKILL too: a lock is
  never stale. A clean release removes the file; one left by a killed holder
  is unlocked and simply taken by the next writer. (Removal is safe: a writer
  that locked a file which was removed meanwhile sees that its inode is no
  longer ``DIR/run.lock`` and tries again.)
- The holder writes who it is (pid, host, command, since when) into the lock
  file; a second writer exits 2 naming it, or with ``wait`` blocks until it is
  free.
- Re-entrant within a process (``run`` holds it and each stage takes it again),
  including from Prefect's task threads.
- Under ``torchrun`` only rank 0 takes it; the other ranks are rank 0's helpers.
- Readers (``verify``, ``verify-run``, ``check``, ``log-run``, reports) take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .common import StageError, log

LOCK_FILE = "run.lock"


class RunDirLocked(StageError):
    """Another process is writing this run directory; names it."""


_held: dict[Path, list[int]] = {}   # run dir -> [fd, depth]
_mutex = threading.Lock()


def _is_main_rank() -> bool:
    from ast_core.distributed import DistEnv
    return DistEnv.from_env().is_main


def read_holder(out: Path) -> dict | None:
    """The description the current (or last killed) holder wrote, or None."""
    try:
        text = (Path(out) / LOCK_FILE).read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe(holder: dict | None) -> str:
    if not holder:
        return "a process that has not yet written its name"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, `{holder.get('command')}`, "
            f"since {holder.get('since')}")


def _holder_now(out: Path) -> dict | None:
    """The holder's description; it writes it right after taking the lock, so wait a moment for it."""
    for _ in range(20):
        if (holder := read_holder(out)) is not None:
            return holder
        time.sleep(0.05)
    return None


def _command() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).resolve() == Path(__file__).with_name("cli.py"):
        argv[0:1] = ["python", "-m", "tasks.cli"]  # started with `python -m tasks.cli` (torchrun, tests)
    return shlex.join(argv)


def _write_holder(fd: int, what: str) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command() or what,
            "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _is_current(fd: int, path: Path) -> bool:
    """The locked descriptor is still the file at ``path`` (not one its last holder removed)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _acquire(out: Path, wait: bool, what: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = describe(_holder_now(out))
                if not wait:
                    raise RunDirLocked(f"{out} is being written by another process ({holder}); wait for it to "
                                       "finish (or pass --wait), or choose another --out") from None
                log.warning("waiting for the other writer of %s to finish: %s", out, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
                log.info("%s is free; continuing", out)
            if _is_current(fd, path):
                _write_holder(fd, what)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it after we opened it: lock the file now at that path


@contextmanager
def hold(out: Path, *, wait: bool = False, what: str = "ast-pipeline") -> Iterator[None]:
    """Be the one writer of ``out`` inside the block (re-entrant; a no-op on torchrun ranks other than 0)."""
    if not _is_main_rank():
        yield
        return
    out = Path(out).resolve()
    with _mutex:  # one thread acquires; the process's other threads then share the lock
        entry = _held.get(out)
        if entry is not None:
            entry[1] += 1
        else:
            _held[out] = entry = [_acquire(out, wait, what), 1]
    try:
        yield
    finally:
        with _mutex:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[out]
        if last:
            try:
                (out / LOCK_FILE).unlink(missing_ok=True)  # while still locked: a waiter then sees the change
            finally:
                os.close(entry[0])  # closing the only descriptor releases the flock
