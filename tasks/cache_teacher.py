"""Stage 2, cache-teacher: run the dense teacher once, store sparse KD targets.

Skipped (and marked so) when the method needs no teacher or the cache is
disabled (then training runs the teacher online).
"""

from __future__ import annotations

from ast_core.integrity import IntegrityError
from ast_core.models import check_same_tokenizer, load_model, load_tokenizer, tokenizer_fingerprint, torch_dtype
from ast_core.teacher_cache import TeacherCache, build_cache, weights_hash
from ast_core.teacher_cache import fingerprint as cache_fingerprint

from .common import RunContext, StageError, log
from .prepare import load_blocks


def teacher_spec(ctx: RunContext) -> str:
    return ctx.cfg.model.teacher or ctx.cfg.model.student


def needed(ctx: RunContext) -> bool:
    return ctx.cfg.train.uses_kd and ctx.cfg.teacher_cache.enabled


def load_teacher(ctx: RunContext):
    """The dense teacher, after checking it shares the student's tokenizer."""
    m = ctx.cfg.model
    spec = teacher_spec(ctx)
    if spec != m.student:
        check_same_tokenizer(load_tokenizer(spec, m.trust_remote_code), load_tokenizer(m.student, m.trust_remote_code))
    return load_model(spec, torch_dtype(m.dtype), seed=ctx.cfg.seed, trust_remote_code=m.trust_remote_code)


def fingerprint_for(teacher: str, tokenizer: str, data: str, c) -> dict:  # type: ignore[no-untyped-def]
    """The cache's identity: teacher weights, tokenizer and data hashes + the settings that shape the targets."""
    return cache_fingerprint(teacher=teacher, tokenizer=tokenizer, data=data, seq_len=c.data.seq_len,
                             fmt=c.teacher_cache.format, k=c.teacher_cache.k, samples=c.teacher_cache.samples,
                             temperature=c.train.temperature, seed=c.seed)


def expected_fingerprint(ctx: RunContext, teacher) -> dict:
    c, manifest = ctx.cfg, ctx.require("prepare")["manifest"]
    tok = load_tokenizer(teacher_spec(ctx), c.model.trust_remote_code)
    return fingerprint_for(weights_hash(teacher), tokenizer_fingerprint(tok), manifest["hash"], c)


def wanted_cache(ctx: RunContext) -> dict:
    """The cache this config asks for: the stored teacher/tokenizer/data identity, the config's settings.

    A cache built with other settings (k, format, temperature, ...) is refused
    with what differs, instead of silently training on the wrong targets.
    """
    done = ctx.require("cache-teacher")
    have = done.get("fingerprint_fields")
    if not have:
        raise StageError("the teacher cache stage was skipped for this run directory; re-run "
                         "ast-pipeline stage cache-teacher")
    return fingerprint_for(have["teacher"], have["tokenizer"], ctx.require("prepare")["manifest"]["hash"], ctx.cfg)


def run(ctx: RunContext) -> dict:
    manifest = ctx.require("prepare")["manifest"]
    if not needed(ctx):
        info = {"skipped": "method needs no teacher" if not ctx.cfg.train.uses_kd else "cache disabled"}
        ctx.mark_done("cache-teacher", "skipped:" + manifest["hash"], **info)
        return info
    teacher = load_teacher(ctx)
    fp = expected_fingerprint(ctx, teacher)
    root = ctx.stage_dir("cache-teacher") / "cache"
    try:
        cache = TeacherCache(root, fp)
        log.info("cache-teacher: up to date (%s)", root)
    except (FileNotFoundError, ValueError) as exc:
        if isinstance(exc, IntegrityError):
            log.warning("cache-teacher: rebuilding the cache: %s", exc)
        cache = build_cache(root, teacher, load_blocks(ctx, "train"), fp,
                            batch_size=ctx.cfg.teacher_cache.batch_size, progress=ctx.progress)
    info = {"fingerprint_fields": fp, "bytes_per_token": cache.bytes_per_token, "blocks": cache.n_blocks}
    ctx.mark_done("cache-teacher", str(sorted(fp.items())), **info)
    log.info("cache-teacher: %s, %.0f bytes per token", fp["format"], cache.bytes_per_token)
    print(f"teacher cache: {cache.bytes_per_token:.0f} bytes per token ({fp['format']})")
    return info
