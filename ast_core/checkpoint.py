"""Crash-safe, resumable training checkpoints (safetensors + JSON, atomic).

A checkpoint is a directory ``step_NNNNNN/`` holding ``model.safetensors``
(weights, masks, SLoRB), ``optim.safetensors`` (optimizer tensors),
``extra.safetensors`` (initial masks, RNG states) and ``state.json`` (step,
hyper-parameters, data position). It is written under a temporary name,
fsynced and renamed, then ``latest`` is replaced atomically: a reader never
sees a torn checkpoint, and a crash during a write leaves the previous one.
``state.json`` also records the sha256 of each tensor file (``sha256``), checked
on load, so a file damaged after it was written is refused by name.
:func:`load_resumable` walks back from ``latest`` to the newest checkpoint that
is complete and intact. Nothing is ever read with pickle (``torch.load``):
safetensors and JSON only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import sharding
from .atomic import atomic_write_text, fsync_dir, fsync_file
from .errors import ASTError
from .integrity import IntegrityError, sha256_file, verify_file

LATEST = "latest"
TENSOR_FILES = ("model.safetensors", "optim.safetensors", "extra.safetensors")
log = logging.getLogger("ast_core.checkpoint")


class CheckpointError(ASTError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; names the file."""


def state_dict_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with tied tensors written once each (safetensors refuses aliases).

    Under FSDP the sharded entries are gathered whole (a collective: every rank calls
    this, in the same order), so the result is what one process would save.
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        loc = sharding.local(v)
        key = (loc.untyped_storage().data_ptr(), loc.storage_offset(), tuple(v.shape))
        ptr = hash(key)
        if ptr in seen:
            continue
        seen[ptr] = k
        v = sharding.full(v.detach())
        out[k] = v.contiguous().clone() if not v.is_contiguous() else v
    return out


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "scalars": {}}
    for idx, pstate in state["state"].items():
        for key, val in pstate.items():
            name = f"{idx}.{key}"
            if torch.is_tensor(val):
                tensors[name] = val.detach().contiguous()
            else:
                meta["scalars"][name] = val
    return tensors, meta


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    return {"rng.torch": torch.get_rng_state()}


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict
    extra: dict[str, torch.Tensor]


def save_checkpoint(root: Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict,
                    extra: dict[str, torch.Tensor], state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/step_{step}`` atomically and point ``root/latest`` at it.

    ``model`` / ``optimizer`` may be given as their already-gathered tensors /
    state dict (FSDP gathers on every rank; only rank 0 writes).

    A write that fails (disk full, permission denied) raises :class:`CheckpointError`
    naming the checkpoint, the cause and the previous checkpoint, which is left intact.
    """
    root = Path(root)
    final = root / f"step_{step:06d}"
    pointer = root / LATEST
    previous = pointer.read_text().strip() if pointer.is_file() else None
    try:
        _write_step_dir(root, final, step, model, optimizer, extra, state)
        atomic_write_text(pointer, final.name + "\n")
    except (OSError, SafetensorError) as exc:
        kept = (f"{pointer} still points to the previous checkpoint {previous}" if previous
                else "no earlier checkpoint exists")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CheckpointError(f"could not write checkpoint {final}: {reason}; {kept}") from exc
    _prune_old(root, keep, final.name)
    return final


def _write_step_dir(root: Path, final: Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict, extra: dict[str, torch.Tensor],
                    state: dict[str, Any]) -> None:
    """All files under a temporary name, fsynced, then one rename: never a torn ``step_*``."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        opt_tensors, opt_meta = flatten_optimizer(optimizer if isinstance(optimizer, dict)
                                                  else optimizer.state_dict())
        files = {
            "model.safetensors": model if isinstance(model, dict) else state_dict_tensors(model),
            "optim.safetensors": opt_tensors,
            "extra.safetensors": {k: v.detach().contiguous() for k, v in extra.items()},
        }
        sha256 = {}
        for fname, tensors in files.items():
            save_file(tensors, str(tmp / fname))
            fsync_file(tmp / fname)
            sha256[fname] = sha256_file(tmp / fname)  # just written: read back from the page cache
        full_state = dict(state, step=step, optimizer=opt_meta, sha256=sha256)
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump(full_state, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            _remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dir(path: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves a hidden ``.step_*`` (cleaned later),
    never a half-deleted ``step_*`` that looks like a checkpoint."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _step_number(name: str) -> int | None:
    digits = name.removeprefix("step_")
    return int(digits) if name.startswith("step_") and digits.isdigit() else None


def _prune_old(root: Path, keep: int, current: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and _step_number(p.name) is not None)
    now = _step_number(current)
    for later in [p for p in steps if now is not None and _step_number(p.name) > now]:
        _remove_dir(later)  # left by a run this one resumed before (a damaged checkpoint it walked back from)
    steps = [p for p in steps if p.exists()]
    for old in steps[:-keep] if keep > 0 else []:
        if old.name != current:
            _remove_dir(old)
    for stale in root.glob(".step_*"):  # temp dirs of writes killed mid-way
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise CheckpointError(f"{pointer} points to {path}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing, truncated or corrupt file is a :class:`CheckpointError` naming it.

    Files whose sha256 ``state.json`` records are checked first (checkpoints written before
    checksums existed have none and are read as before).
    """
    path = Path(path)
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        sums = state.pop("sha256", None) or {}
        opt_meta = state.pop("optimizer")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: {state_file} missing") from None
    except (json.JSONDecodeError, OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt or truncated: {exc!r}") from None
    model, opt_tensors, extra = (_load_tensors(path / name) for name in TENSOR_FILES)  # a truncated file fails here
    for name in TENSOR_FILES:  # a file that parses but holds other bytes (a flipped bit) fails here
        if name in sums:
            try:
                verify_file(path / name, sums[name], "checkpoint file")
            except IntegrityError as exc:
                raise CheckpointError(str(exc)) from None
    try:
        optimizer = unflatten_optimizer(opt_tensors, opt_meta)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {state_file} is corrupt: {exc!r}") from None
    return Checkpoint(path, state, model, optimizer, extra)


def load_resumable(root: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest complete, intact checkpoint at or before ``latest``, and why newer ones were skipped.

    Returns ``(None, [])`` when there is no ``latest`` (nothing to resume). A
    ``latest`` whose checkpoint is incomplete, truncated or fails its checksum
    falls back to the next older ``step_*``; the list says which were skipped
    and why. No intact checkpoint at all is a :class:`CheckpointError`.
    """
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None, []
    try:
        named = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        named = ""
    newest = _step_number(named)
    older = sorted((p for p in root.glob("step_*") if p.is_dir() and (n := _step_number(p.name)) is not None
                    and (newest is None or n < newest)), key=lambda p: _step_number(p.name), reverse=True)
    candidates = ([root / named] if newest is not None else []) + older
    skipped: list[str] = []
    if newest is None:
        skipped.append(f"{pointer} names no checkpoint ({named[:40]!r})")
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            log.warning("resume: falling back to %s (step %d): %s", path.name, ckpt.state["step"],
                        "; ".join(skipped))
        return ckpt, skipped
    raise CheckpointError(f"no intact checkpoint to resume from in {root}: {'; '.join(skipped) or 'none'}; "
                          "run again without --resume to start over")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {file.parent} is incomplete: {file} missing") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint file {file} is corrupt or truncated: {exc}") from None


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Load a (tie-deduplicated) state dict strictly; errors name the checkpoint."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    # keys dropped because they alias another tensor (tied embeddings) are fine
    missing = [k for k in missing if not _is_alias(model, k, tensors)]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{origin} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in tensors.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(f"{origin}: {k} has shape {tuple(v.shape)}, model expects {tuple(expected[k].shape)}")
    model.load_state_dict(sharding.shard_model_tensors(model, tensors), strict=False)


def _is_alias(model: torch.nn.Module, key: str, tensors: dict[str, torch.Tensor]) -> bool:
    sd = {k: sharding.local(v) for k, v in model.state_dict().items()}
    target = sd[key]
    return any(sd[k].untyped_storage().data_ptr() == target.untyped_storage().data_ptr()
               for k in tensors if k in sd)
