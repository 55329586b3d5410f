"""``ast-pipeline verify-run DIR``: check every checksum recorded in a run directory.

What is checked (each file against the sha256 recorded when it was written):
the token blocks (``prepare/*.npy``, from the prepare manifest), the teacher-cache
shards (``cache_teacher/cache/fingerprint.json``), the trained model
(``train/final/meta.json``) and every training checkpoint (``state.json``).
A file written before checksums were recorded is listed as unchecked, not as
bad. A reader: it takes no lock and writes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ast_core.checkpoint import TENSOR_FILES
from ast_core.integrity import IntegrityError, verify_file

from .common import STAGES, StageError, rebuild_command


@dataclass
class RunReport:
    out: Path
    ok_files: list[Path] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def text(self) -> str:
        lines = [f"{self.out}: {len(self.ok_files)} files intact, {len(self.bad)} damaged, "
                 f"{len(self.unchecked)} without a recorded checksum"]
        lines += [f"  damaged: {b}" for b in self.bad]
        lines += [f"  unchecked: {u}" for u in self.unchecked]
        return "\n".join(lines)

    def check(self, path: Path, digest: str | None, what: str, stage: str) -> None:
        if digest is None:
            self.unchecked.append(f"{path} (written before checksums were recorded)")
            return
        try:
            verify_file(path, digest, what)
        except IntegrityError as exc:
            self.bad.append(f"{exc}; rebuild it with `{rebuild_command(self.out, stage)}`")
        else:
            self.ok_files.append(path)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is unreadable: {exc}") from None


def verify_run(out: Path) -> RunReport:
    out = Path(out).resolve()
    stage_dirs = [out / s.replace("-", "_") for s in STAGES]
    if not out.is_dir() or not any(d.is_dir() for d in stage_dirs):
        raise StageError(f"{out} is not a run directory (no stage folders such as {stage_dirs[0].name}/)")
    report = RunReport(out)

    prep = _json(out / "prepare" / "done.json")
    if prep is not None:
        sums = prep.get("manifest", {}).get("sha256", {})
        for split in ("train", "val", "calib"):
            report.check(out / "prepare" / f"{split}.npy", sums.get(split), "token blocks", "prepare")

    cache = out / "cache_teacher" / "cache"
    meta = _json(cache / "fingerprint.json")
    if meta is not None:
        sums = meta.get("sha256")
        shards = sorted(p.name for p in cache.glob("shard_*.npy"))
        for name in sorted(set(shards) | set(sums or {})):
            report.check(cache / name, (sums or {}).get(name), "teacher cache shard", "cache-teacher")

    final = out / "train" / "final"
    fmeta = _json(final / "meta.json")
    if fmeta is not None:
        report.check(final / "model.safetensors", (fmeta.get("sha256") or {}).get("model.safetensors"),
                     "trained model", "train")

    for step in sorted((out / "train" / "checkpoints").glob("step_*")):
        try:
            sums = (_json(step / "state.json") or {}).get("sha256")
        except StageError as exc:
            report.bad.append(f"checkpoint {step} is damaged: {exc} (a --resume falls back to an older one)")
            continue
        for name in TENSOR_FILES:
            report.check(step / name, (sums or {}).get(name), "checkpoint file", "train")
    return report
