"""Atomic file writes: a reader never sees half a file, a crash never leaves one.

Every writer in the project goes through here: the content goes to a temporary
file in the destination's folder (same file system), is flushed and fsynced,
then renamed over the destination, and the folder is fsynced so the rename
itself survives a power cut. A failure removes the temporary file and leaves
any previous version of the destination untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed over ``path`` when the block ends.

    For writers that want a file name (``save_file``, ``savefig``, ``np.save``).
    ``suffix`` keeps an extension some writers look at (``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{suffix}.tmp" if suffix else ".tmp",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    if suffix:  # writers such as savefig pick the format from the last extension
        named = tmp.with_name(tmp.name.removesuffix(".tmp"))
        tmp.rename(named)
        tmp = named
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
