"""Stage 3, train: AST sparse training (or a one-shot baseline) from the dense weights.

Outputs (``train/``): ``checkpoints/`` (resumable), ``final/model.safetensors``
(weights + masks + SLoRB), ``final/meta.json`` (how to rebuild the model, and the
sha256 of ``model.safetensors``, checked by every reader) and ``history.jsonl``
(per-step metrics, with CSV views ``history.csv`` and ``flips.csv`` for ``dvc plots``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ast_core import distributed, sharding
from ast_core.atomic import atomic_write_text
from ast_core.checkpoint import state_dict_tensors
from ast_core.distributed import DistEnv
from ast_core.models import load_model, torch_dtype
from ast_core.recipe import Recipe, prepare_student
from ast_core.teacher_cache import TeacherCache
from ast_core.trained import save_trained, verify_trained
from ast_core.train import CachedTeacher, OnlineTeacher, StepLog, train

from . import cache_teacher
from .common import RunContext, StageError, hash_json, log
from .prepare import load_blocks


def fingerprint(ctx: RunContext) -> str:
    c = ctx.cfg
    return hash_json({"prepare": ctx.require("prepare")["fingerprint"],
                      "cache": (ctx.done("cache-teacher") or {}).get("fingerprint"),
                      "model": c.model.model_dump(mode="json"), "sparsity": c.sparsity.model_dump(mode="json"),
                      "teacher_cache": c.teacher_cache.model_dump(mode="json"),
                      "train": c.train.model_dump(mode="json"), "seed": c.seed})


def _calib_batches(ctx: RunContext, batch: int = 4) -> list[torch.Tensor]:
    calib = load_blocks(ctx, "calib")
    return [torch.from_numpy(calib[i:i + batch].astype(np.int64)) for i in range(0, len(calib), batch)]


def recipe_of(c) -> Recipe:  # type: ignore[no-untyped-def]
    """The validated config's recipe (:class:`ast_core.recipe.Recipe`)."""
    return Recipe(method=c.train.method, n=c.sparsity.n, m=c.sparsity.m, exclude=tuple(c.sparsity.exclude),
                  init_mask=c.sparsity.init_mask, wanda_refresh=c.train.refresh_score == "wanda",
                  slorb_group=c.train.slorb_group, slorb_trainable_projection=c.train.slorb_trainable_projection,
                  slorb_init=c.train.slorb_init)


def run(ctx: RunContext, on_step: Callable[[StepLog], None] | None = None,
        stop_after: int | None = None) -> dict:
    c = ctx.cfg
    fp = fingerprint(ctx)
    if ctx.is_done("train", fp):
        if (why := _damaged(ctx)) is None:
            log.info("train: up to date")
            return ctx.done("train")
        log.warning("train: rebuilding train/final: %s", why)
    out = ctx.stage_dir("train")
    ckpt_dir = out / "checkpoints"
    env = DistEnv.from_env()
    device = env.device(c.train.device)
    method, spec = c.train.method, c.train.spec
    if env.enabled and not spec.trains:
        raise StageError(f"train.method {method} trains nothing: run it as one process, not under torchrun")
    distributed.init(env, device)
    resuming = ctx.resume and (ckpt_dir / "latest").exists()
    if not resuming and ckpt_dir.exists() and env.is_main:
        import shutil
        shutil.rmtree(ckpt_dir)  # a fresh run never mixes with an old run's checkpoints
    distributed.barrier(env)
    torch.manual_seed(c.seed)
    dense = load_model(c.model.student, torch_dtype(c.model.dtype), seed=c.seed,
                       trust_remote_code=c.model.trust_remote_code)
    # a resume takes masks, refresh scales and SLoRB values from the checkpoint
    student = prepare_student(dense, recipe_of(c), lambda: _calib_batches(ctx), fresh=not resuming)
    model = student.model
    info: dict = {"method": method, **student.info}
    final: torch.nn.Module | dict[str, torch.Tensor] = model  # what train/final holds
    if spec.trains:
        teacher = None
        if spec.distils:
            if cache_teacher.needed(ctx):
                with ctx.checked("cache-teacher"):  # every shard's sha256, once, before training
                    cache = TeacherCache(ctx.stage_dir("cache-teacher") / "cache", cache_teacher.wanted_cache(ctx))
                teacher = CachedTeacher(cache)
            else:
                teacher = OnlineTeacher(cache_teacher.load_teacher(ctx).to(device), want_hidden=c.train.squarehead)
        val = load_blocks(ctx, "val") if c.train.eval_every > 0 else None
        model.to(device)
        result = train(model, load_blocks(ctx, "train"), c.train, seed=c.seed, teacher=teacher,
                       checkpoint_dir=ckpt_dir, resume=resuming, on_step=on_step, progress=ctx.progress,
                       stop_after=stop_after, val_blocks=val, dist=env,
                       refresh_scale=student.refresh_scale)
        if sharding.model_is_sharded(model):  # every rank helps gather the full weights
            final = {k: v.cpu() for k, v in state_dict_tensors(model).items()}
        else:
            model.to("cpu")
        if not env.is_main:  # rank 0 writes the stage's outputs; the others wait for them
            distributed.barrier(env)
            return ctx.done("train") or {}
        if result.steps < c.train.steps:
            raise StageError(f"training stopped at step {result.steps} of {c.train.steps}; "
                             "continue with --resume")
        atomic_write_text(out / "history.jsonl", "".join(json.dumps(h) + "\n" for h in result.history))
        write_plot_tables(out, result.history)
        if result.fell_back:
            info["resume_skipped"] = result.fell_back  # damaged newer checkpoints, and why
        info.update(tokens_trained=result.tokens, steps=result.steps, resumed_from=result.resumed_from,
                    flip_rate_final=result.last_flip.rate_prev if result.last_flip else 0.0,
                    flip_rate_init_final=result.last_flip.rate_init if result.last_flip else 0.0)
    save_final(ctx, final, info)
    ctx.mark_done("train", fp, **info)
    distributed.barrier(env)
    return ctx.done("train")


def write_plot_tables(out: Path, history: list[dict]) -> None:
    """CSV views of ``history.jsonl`` for ``dvc plots`` (DVC reads CSV/JSON, not JSON lines):
    ``history.csv`` every logged step, ``flips.csv`` the mask-refresh steps only, ``val.csv``
    the validation perplexity vs tokens (only with ``train.eval_every``)."""
    from math import exp
    rows = [f"{h['step']},{h['loss']},{h['ce']},{h['kl']},{h['lr']},{h['lam']},{exp(min(h['ce'], 700.0))}\n"
            for h in history if "loss" in h]  # step 0 holds only the starting validation loss
    atomic_write_text(out / "history.csv", "step,loss,ce,kl,lr,lam,train_ppl\n" + "".join(rows))
    flips = [f"{h['step']},{h['flip_rate_prev']},{h['flip_rate_init']}\n" for h in history if "flip_rate_prev" in h]
    atomic_write_text(out / "flips.csv", "step,flip_rate_prev,flip_rate_init\n" + "".join(flips))
    val = [f"{h['step']},{h['tokens']},{h['val_loss']},{h['val_ppl']}\n" for h in history if "val_loss" in h]
    if val:
        atomic_write_text(out / "val.csv", "step,tokens,val_loss,val_ppl\n" + "".join(val))


def save_final(ctx: RunContext, model: torch.nn.Module | dict[str, torch.Tensor], info: dict) -> None:
    """``train/final/`` (:mod:`ast_core.trained`) from the model, or its already-gathered tensors (FSDP)."""
    c = ctx.cfg
    meta = {"student": c.model.student, "dtype": c.model.dtype, "seed": c.seed, "method": c.train.method,
            "n": c.sparsity.n, "m": c.sparsity.m, "exclude": c.sparsity.exclude,
            "slorb_group": c.train.slorb_group if c.train.spec.slorb else None,
            "slorb_trainable_projection": c.train.slorb_trainable_projection, **info}
    save_trained(ctx.stage_dir("train") / "final", model, meta)


def _damaged(ctx: RunContext) -> str | None:
    """Why the finished stage's ``final/`` cannot be used (missing, or a failed checksum), or None."""
    try:
        verify_trained(ctx.stage_dir("train") / "final")
    except (OSError, ValueError) as exc:  # IntegrityError is a ValueError, as is a corrupt meta.json
        return str(exc)
    return None
