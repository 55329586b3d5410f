"""One prepared data set and one teacher cache shared by several run directories.

Side-by-side comparisons (the ``compare`` flow, the benchmarks) are fair only
when every method trains on the same token blocks and distils from the same
teacher targets; building them once also saves the most expensive preparation.
A method's run directory gets the shared ``prepare/`` files one by one and the
shared ``cache_teacher/cache`` directory as relative symlinks. Never the whole
stage directory: a ``done.json`` written in one method's directory must not
overwrite the shared one (atomic writes replace the link, not its target; a
cache rebuild through the link refuses to remove a symlink).
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import RunContext


def _link(target: Path, link: Path) -> None:
    """A relative symlink (the compare directory stays movable); an existing file is left alone."""
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target, link.parent), link)


def link_shared(shared: RunContext, ctx: RunContext, cache: bool = True) -> None:
    """Give ``ctx`` the shared prepare outputs (file by file) and, with ``cache``, the teacher cache.

    ``cache=False`` for a run whose cache settings differ (another format): it
    builds its own cache next to the shared data.
    """
    for f in sorted(shared.stage_dir("prepare").iterdir()):
        if f.is_file() and not f.name.startswith("."):
            _link(f, ctx.stage_dir("prepare") / f.name)
    shared_cache = shared.stage_dir("cache-teacher") / "cache"
    if cache and shared_cache.is_dir():
        _link(shared_cache, ctx.stage_dir("cache-teacher") / "cache")




SHARED = "shared"


def open_shared(cfg, root: Path, run, *, progress: bool = False) -> RunContext:  # type: ignore[no-untyped-def]
    """``prepare`` + ``cache-teacher`` once, in ``<root>/shared``, through ``run(ctx, stage)``
    (:func:`tasks.pipeline.run_stage`, or the flow's Prefect task). ``cfg``'s method must distil,
    so the shared teacher cache is built. ``progress``: tqdm bars (the benchmarks, run from a
    terminal; never under Prefect, whose logs a redrawn bar would garble)."""
    from . import runlock
    ctx = RunContext.create(cfg, Path(root) / SHARED, progress=progress)
    with runlock.hold(ctx.out, what="shared base"):
        ctx.claim()
    for stage in ("prepare", "cache-teacher"):
        run(ctx, stage)
    return ctx


def open_variant(shared: RunContext, cfg, root: Path, name: str, *, cache: bool = True,  # type: ignore[no-untyped-def]
                 resume: bool = False, progress: bool = False) -> RunContext:
    """``<root>/<name>``: one variant's run directory, claimed (under its lock) and linked to the shared base
    (``progress`` as in :func:`open_shared`)."""
    from . import runlock
    ctx = RunContext.create(cfg, Path(root) / name, resume=resume, progress=progress)
    with runlock.hold(ctx.out, what=f"variant {name}"):
        ctx.claim()
    link_shared(shared, ctx, cache=cache)
    return ctx
