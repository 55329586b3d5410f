"""What every stage shares: the run directory, stage markers and model rebuilding.

A run directory (``--out``, default ``artifacts/<params name>/``) holds one
folder per stage. A stage that finishes writes ``<stage>/done.json`` with the
fingerprint of its inputs; a later call with the same fingerprint skips the
stage, which is how re-runs (CLI, Prefect, DVC) avoid redoing finished work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ast_core.atomic import atomic_write_json
from ast_core.integrity import IntegrityError

from .config import PipelineConfig
from ast_core.errors import ASTError

log = logging.getLogger("ast_pipeline")

STAGES = ("prepare", "cache-teacher", "train", "compile", "evaluate")
REPO_ROOT = Path(__file__).resolve().parents[1]


class StageError(ASTError, RuntimeError):
    """A stage cannot run (missing input, mismatched artifact); the message says what to do."""


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rebuild_command(out: Path, stage: str) -> str:
    """How to rebuild a stage's outputs: the stage redoes them when one fails its checksum."""
    resume = " --resume" if stage == "train" else ""  # train/final is rewritten from the last checkpoint
    return f"ast-pipeline stage {stage} --params ... --out {out}{resume}"


@dataclass
class RunContext:
    """A validated config plus where its artifacts live."""
    cfg: PipelineConfig
    out: Path
    resume: bool = False
    progress: bool = True
    wait: bool = False  # wait for another writer of ``out`` to finish instead of refusing (tasks.runlock)

    @classmethod
    def create(cls, cfg: PipelineConfig, out: str | Path | None = None, resume: bool = False,
               progress: bool = True, wait: bool = False) -> "RunContext":
        if out:
            return cls(cfg, Path(out).resolve(), resume, progress, wait)  # the user's explicit choice
        artifacts = (REPO_ROOT / "artifacts").resolve()
        root = (artifacts / cfg.name).resolve()
        if root.parent != artifacts:  # a config value never chooses a directory outside artifacts/
            raise StageError(f"name {cfg.name!r} does not name a directory inside {artifacts}")
        return cls(cfg, root, resume, progress, wait)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage.replace("-", "_")

    def done(self, stage: str) -> dict | None:
        p = self.stage_dir(stage) / "done.json"
        return json.loads(p.read_text()) if p.exists() else None

    def is_done(self, stage: str, fingerprint: str) -> bool:
        d = self.done(stage)
        return bool(d and d.get("fingerprint") == fingerprint)

    def mark_done(self, stage: str, fingerprint: str, **info: Any) -> None:
        atomic_write_json(self.stage_dir(stage) / "done.json", {"fingerprint": fingerprint, **info})

    def require(self, stage: str) -> dict:
        d = self.done(stage)
        if d is None:
            raise StageError(f"stage '{stage}' has not completed in {self.out}; run it first "
                             f"(ast-pipeline stage {stage} --params ... --out {self.out})")
        return d

    def rebuild_command(self, stage: str) -> str:
        return rebuild_command(self.out, stage)

    @contextmanager
    def checked(self, stage: str) -> Iterator[None]:
        """Reading ``stage``'s outputs: a checksum mismatch also says how to rebuild them."""
        try:
            yield
        except IntegrityError as exc:
            raise IntegrityError(f"{exc}; rebuild it with `{self.rebuild_command(stage)}`", exc.path) from None

    def claim(self) -> None:
        """Refuse an --out that holds a different run's artifacts (unless --resume of the same)."""
        marker = self.out / "run.json"
        mine = {"name": self.cfg.name, "config_hash": hash_json(self.cfg.model_dump(mode="json"))}
        if marker.exists():
            theirs = json.loads(marker.read_text())
            started = any(self.done(stage) for stage in STAGES)
            if theirs.get("config_hash") != mine["config_hash"] and started:
                raise StageError(
                    f"{self.out} holds artifacts of a different run (name {theirs.get('name')!r}, config "
                    f"{theirs.get('config_hash')}, this run {mine['config_hash']}); choose another --out or "
                    "delete that directory")
        self.out.mkdir(parents=True, exist_ok=True)
        from .run_record import git_commit  # lazy: run_record imports this module
        atomic_write_json(marker, {**mine, "config": self.cfg.model_dump(mode="json"), "git_commit": git_commit()})


def configure_threads() -> None:
    """Use every core for intra-op parallelism unless the user said otherwise."""
    import torch
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
