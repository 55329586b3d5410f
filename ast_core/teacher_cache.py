"""The teacher cache: sparse KD targets per training token, in memory-mapped shards.

Why: training must not hold or run the teacher. Full-vocabulary logits are far
too big (49,152 × 2 bytes per token for SmolLM2), so each token keeps a sparse
target (``ast_core.distill.make_targets``: top-k + rest mass, or sampled ids +
counts). Layout of a cache directory::

    fingerprint.json          what the cache was built from (refused on mismatch), and the
                              sha256 of every shard file (``sha256``; checked when opened)
    shard_00000.<field>.npy   one .npy per target field, rows = training blocks

Shards hold ``shard_blocks`` consecutive training blocks, so ranks can read
disjoint shards. The directory is built under a temporary name and renamed
when complete: a half-written cache is never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_json, fsync_dir
from .distill import make_targets
from .integrity import sha256_file, verify_file
from .progress import bar as progress_bar
from .errors import ASTError

FINGERPRINT = "fingerprint.json"
log = logging.getLogger("ast_core.teacher_cache")


class CacheMismatch(ASTError, ValueError):
    """A cache built from other inputs than the run asks for; says what differs."""


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over the model's parameters (names, shapes, bytes): identifies the teacher."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                 if t.dtype != torch.bool else t.cpu().numpy().tobytes())
    return h.hexdigest()[:20]


def fingerprint(*, teacher: str, tokenizer: str, data: str, seq_len: int, fmt: str, k: int, samples: int,
                temperature: float, seed: int) -> dict[str, Any]:
    """Everything the cached targets depend on. Only the fields that matter for the format count."""
    fp: dict[str, Any] = {"teacher": teacher, "tokenizer": tokenizer, "data": data, "seq_len": seq_len,
                          "format": fmt, "temperature": float(temperature)}
    if fmt in ("topk", "head+sampled"):
        fp["k"] = k
    if fmt in ("sampled", "head+sampled"):
        fp["samples"] = samples
        fp["seed"] = seed
    return fp


def describe_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str:
    diffs = [f"{key}: cache has {have.get(key)!r}, run wants {want.get(key)!r}"
             for key in sorted(set(have) | set(want)) if have.get(key) != want.get(key)]
    return "; ".join(diffs)


class TeacherCache:
    """Read side: ``targets(block_ids)`` returns the stored tensors for those blocks.

    ``verify``: check every shard against the sha256 recorded when it was written
    (:class:`ast_core.integrity.IntegrityError` naming the shard on a mismatch). A cache
    built before checksums were recorded is read unchecked, with a warning.
    """

    def __init__(self, root: Path, expected: dict[str, Any] | None = None, *, verify: bool = True) -> None:
        self.root = Path(root)
        fp_path = self.root / FINGERPRINT
        if not fp_path.exists():
            raise FileNotFoundError(f"teacher cache not found or incomplete: {fp_path} missing")
        meta = json.loads(fp_path.read_text())
        self.fp: dict[str, Any] = meta["fingerprint"]
        if expected is not None and self.fp != expected:
            raise CacheMismatch(f"teacher cache {self.root} was built for other inputs: "
                                f"{describe_mismatch(self.fp, expected)}")
        self.format: str = self.fp["format"]
        self.n_blocks: int = meta["n_blocks"]
        self.shard_blocks: int = meta["shard_blocks"]
        self.fields: dict[str, dict] = meta["fields"]
        self.bytes_per_token: float = meta["bytes_per_token"]
        self._shards: dict[int, dict[str, np.ndarray]] = {}
        for shard in range(self.n_shards):
            for name, spec in self.fields.items():
                p = self._path(shard, name)
                rows = min(self.shard_blocks, self.n_blocks - shard * self.shard_blocks)
                expected_bytes = rows * int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
                if not p.exists() or p.stat().st_size < expected_bytes:
                    raise CacheMismatch(f"teacher cache shard {p} is missing or truncated")
        self.sha256: dict[str, str] | None = meta.get("sha256")
        if verify and self.sha256 is None:
            log.warning("teacher cache %s records no checksums (built before they existed): its shards "
                        "are not verified; rebuild the cache to add them", self.root)
        for name, digest in (self.sha256 or {}).items() if verify else ():
            verify_file(self.root / name, digest, "teacher cache shard")

    @property
    def n_shards(self) -> int:
        return -(-self.n_blocks // self.shard_blocks)

    def _path(self, shard: int, name: str) -> Path:
        return self.root / f"shard_{shard:05d}.{name.replace('+', '_')}.npy"

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            try:
                self._shards[shard] = {n: np.load(self._path(shard, n), mmap_mode="r") for n in self.fields}
            except (ValueError, OSError) as exc:
                raise CacheMismatch(f"teacher cache shard {shard} in {self.root} is unreadable: {exc}") from None
        return self._shards[shard]

    def targets(self, block_ids: np.ndarray) -> dict[str, torch.Tensor]:
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.fields}
        for b in np.asarray(block_ids):
            if not 0 <= b < self.n_blocks:
                raise IndexError(f"block {b} outside the teacher cache (0..{self.n_blocks - 1})")
            shard = self._shard(int(b) // self.shard_blocks)
            for n in self.fields:
                out[n].append(np.asarray(shard[n][int(b) % self.shard_blocks]))
        return {n: torch.from_numpy(np.stack(v)) for n, v in out.items()}


def _torch_to_np_dtype(t: torch.Tensor) -> np.dtype:
    return torch.empty((), dtype=t.dtype).numpy().dtype


@torch.no_grad()
def build_cache(root: Path, teacher: torch.nn.Module, blocks: np.ndarray, fp: dict[str, Any], *,
                batch_size: int = 4, shard_blocks: int = 256, progress: bool = True) -> TeacherCache:
    """Run the teacher once over ``blocks`` and write the targets; returns the reader."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    gen = torch.Generator().manual_seed(int(fp.get("seed", 0)))
    n = len(blocks)
    teacher.eval()
    files: dict[tuple[int, str], np.ndarray] = {}
    fields: dict[str, dict] = {}
    try:
        for start in progress_bar(range(0, n, batch_size), progress, "teacher cache", total=-(-n // batch_size)):
            ids = torch.from_numpy(blocks[start:start + batch_size].astype(np.int64))
            logits = teacher(ids).logits.float()
            targets = make_targets(logits, fp["format"], fp.get("k", 0), fp.get("samples", 0),
                                   fp["temperature"], gen)
            for row in range(ids.shape[0]):
                b = start + row
                shard, local = divmod(b, shard_blocks)
                for name, t in targets.items():
                    key = (shard, name)
                    if key not in files:
                        rows = min(shard_blocks, n - shard * shard_blocks)
                        shape = (rows,) + tuple(t.shape[1:])
                        fields[name] = {"dtype": str(_torch_to_np_dtype(t)), "shape": list(t.shape[1:])}
                        path = tmp / f"shard_{shard:05d}.{name.replace('+', '_')}.npy"
                        files[key] = np.lib.format.open_memmap(path, mode="w+", dtype=_torch_to_np_dtype(t),
                                                               shape=shape)
                    files[key][local] = t[row].numpy()
        for arr in files.values():
            arr.flush()
        del files
        # memory-mapped rows are written out of order, so the files are hashed once complete
        # (read back from the page cache; about 0.3 s per 538 MB)
        sha256 = {p.name: sha256_file(p) for p in sorted(tmp.glob("shard_*.npy"))}
        tokens = n * blocks.shape[1]
        total_bytes = sum(p.stat().st_size for p in tmp.glob("*.npy"))
        payload = n * sum(int(np.prod(f["shape"])) * np.dtype(f["dtype"]).itemsize for f in fields.values())
        meta = {"fingerprint": fp, "n_blocks": n, "shard_blocks": shard_blocks, "fields": fields,
                "bytes_per_token": payload / max(tokens, 1), "total_bytes": total_bytes, "sha256": sha256}
        atomic_write_json(tmp / FINGERPRINT, meta)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
        fsync_dir(root.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TeacherCache(root, fp, verify=False)  # its checksums were just computed from these files
