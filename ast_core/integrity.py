"""Content checksums (sha256) of the files one stage writes and another reads.

Why: an atomic rename keeps a file whole, not correct. A flipped bit on disk,
a bad copy, or a cache carried between machines reads back without any error
and would train or evaluate on the wrong numbers. So every artifact another
stage consumes carries the sha256 of its bytes, recorded when it is written,
and its reader checks it before use, once per stage run (a file verified
once is not hashed again until :func:`forget_verified`, which
``tasks.pipeline.run_stage`` calls as each stage starts).

Cost: sha256 runs at about 1.7 GB/s on one core of the development machine,
so checking SmolLM2-135M's 538 MB float32 weights takes about 0.3 s (the
measurement is in the README).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import BinaryIO

from .errors import ASTError

CHUNK = 8 << 20


class IntegrityError(ASTError, ValueError):
    """A file whose bytes are not those recorded when it was written; names the file."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class HashingWriter:
    """A binary file wrapper that hashes what passes through ``write``: a checksum without a second pass."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


_verified: dict[tuple[str, int, int, int], str] = {}
_lock = threading.Lock()


def verify_file(path: Path, expected: str, what: str = "file") -> None:
    """Raise :class:`IntegrityError` unless ``path`` hashes to ``expected``.

    A file already verified (same inode, size and mtime) since the last :func:`forget_verified` is not
    hashed again.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IntegrityError(f"{what} {path} is missing", path) from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    with _lock:
        if _verified.get(key) == expected:
            return
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{what} {path} fails its checksum (sha256 {actual[:16]}..., recorded when it "
                             f"was written {expected[:16]}...): it was corrupted or replaced", path)
    with _lock:
        _verified[key] = expected


def forget_verified() -> None:
    """Hash every file again on its next check (a new stage run)."""
    with _lock:
        _verified.clear()
