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
from safetensors.torch import load_file, save_file

from ast_core.calibration import collect_act_sq_mean, collect_group_cross
from ast_core import distributed, sharding
from ast_core.distributed import DistEnv
from ast_core.checkpoint import atomic_write_json, atomic_write_text, load_model_tensors, state_dict_tensors
from ast_core.integrity import sha256_file, verify_file
from ast_core.masks import magnitude_score, nm_mask, wanda_score
from ast_core.models import load_model
from ast_core.oneshot import oneshot_prune
from ast_core.recipe import method as method_spec
from ast_core.slorb import add_slorb, check_group_size
from ast_core.sparse import sparse_layers, sparsify
from ast_core.teacher_cache import TeacherCache
from ast_core.train import CachedTeacher, OnlineTeacher, StepLog, train

from . import cache_teacher
from .common import RunContext, StageError, hash_json, log, torch_dtype
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


def init_masks(model: torch.nn.Module, how: str, stats: dict[str, torch.Tensor] | None) -> None:
    """Initial N:M mask: Wanda score from the calibration statistics ``stats``
    (:func:`collect_act_sq_mean`, also the Wanda refresh's column norms), or magnitude."""
    if how == "wanda" and stats is None:
        raise ValueError("a Wanda initial mask needs the calibration activation statistics")
    for name, layer in sparse_layers(model):
        score = wanda_score(layer.weight, stats[name]) if how == "wanda" else magnitude_score(layer.weight)
        layer.set_mask(nm_mask(score, layer.n, layer.m))


def build_student(ctx: RunContext) -> torch.nn.Module:
    """Dense student -> sparse layers (masks all ones) [+ SLoRB is attached after the mask]."""
    c = ctx.cfg
    model = load_model(c.model.student, torch_dtype(c.model.dtype), seed=c.seed,
                       trust_remote_code=c.model.trust_remote_code)
    if c.train.spec.sparse:
        sparsify(model, c.sparsity.n, c.sparsity.m, c.sparsity.exclude)
    return model


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
    model = build_student(ctx)
    info: dict = {"method": method}
    final: torch.nn.Module | dict[str, torch.Tensor] = model  # what train/final holds
    if spec.oneshot:
        info.update(oneshot_prune(model, spec.oneshot, _calib_batches(ctx)))
    elif spec.trains:
        refresh_scale = None
        if not resuming:  # a resume takes its masks and refresh scales from the checkpoint
            stats = (collect_act_sq_mean(model, _calib_batches(ctx))
                     if c.sparsity.init_mask == "wanda" or c.train.wanda_refresh else None)
            init_masks(model, c.sparsity.init_mask, stats)
            if c.train.wanda_refresh:
                refresh_scale = {name: s.sqrt() for name, s in stats.items()}
        if spec.slorb:
            cross = None  # mean init; a resume loads S from the checkpoint either way
            if c.train.slorb_init == "lstsq" and not resuming:
                check_group_size(model, c.train.slorb_group)  # before the calibration pass
                cross = collect_group_cross(model, _calib_batches(ctx), c.train.slorb_group)
            info["slorb_params"] = add_slorb(model, c.train.slorb_group, c.train.slorb_trainable_projection,
                                             cross)
        teacher = None
        if c.train.uses_kd:
            if cache_teacher.needed(ctx):
                with ctx.checked("cache-teacher"):  # every shard's sha256, once, before training
                    cache = TeacherCache(ctx.stage_dir("cache-teacher") / "cache", _wanted_cache(ctx))
                teacher = CachedTeacher(cache)
            else:
                teacher = OnlineTeacher(cache_teacher.load_teacher(ctx).to(device), want_hidden=c.train.squarehead)
        val = load_blocks(ctx, "val") if c.train.eval_every > 0 else None
        model.to(device)
        result = train(model, load_blocks(ctx, "train"), c.train, seed=c.seed, teacher=teacher,
                       checkpoint_dir=ckpt_dir, resume=resuming, on_step=on_step, progress=ctx.progress,
                       stop_after=stop_after, val_blocks=val, dist=env,
                       refresh_scale=refresh_scale)
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


def _wanted_cache(ctx: RunContext) -> dict:
    """The cache this config asks for: the stored teacher/tokenizer/data identity, the config's settings.

    A cache built with other settings (k, format, temperature, ...) is refused
    with what differs, instead of silently training on the wrong targets.
    """
    c, done = ctx.cfg, ctx.require("cache-teacher")
    have = done.get("fingerprint_fields")
    if not have:
        raise StageError("the teacher cache stage was skipped for this run directory; re-run "
                         "ast-pipeline stage cache-teacher")
    return fingerprint_for(have["teacher"], have["tokenizer"], ctx.require("prepare")["manifest"]["hash"], c)


def fingerprint_for(teacher: str, tokenizer: str, data: str, c) -> dict:
    from ast_core.teacher_cache import fingerprint as cache_fingerprint
    return cache_fingerprint(teacher=teacher, tokenizer=tokenizer, data=data, seq_len=c.data.seq_len,
                             fmt=c.teacher_cache.format, k=c.teacher_cache.k, samples=c.teacher_cache.samples,
                             temperature=c.train.temperature, seed=c.seed)


def save_final(ctx: RunContext, model: torch.nn.Module | dict[str, torch.Tensor], info: dict) -> None:
    """``final/model.safetensors`` from the model, or from its already-gathered tensors (FSDP)."""
    c = ctx.cfg
    final = ctx.stage_dir("train") / "final"
    final.mkdir(parents=True, exist_ok=True)
    tmp = final / ".model.safetensors.tmp"
    save_file(model if isinstance(model, dict) else state_dict_tensors(model), str(tmp))
    digest = sha256_file(tmp)  # just written: read back from the page cache (~0.3 s for SmolLM2-135M)
    tmp.replace(final / "model.safetensors")
    meta = {"student": c.model.student, "dtype": c.model.dtype, "seed": c.seed, "method": c.train.method,
            "n": c.sparsity.n, "m": c.sparsity.m, "exclude": c.sparsity.exclude,
            "slorb_group": c.train.slorb_group if c.train.spec.slorb else None,
            "slorb_trainable_projection": c.train.slorb_trainable_projection, **info,
            "sha256": {"model.safetensors": digest}}
    atomic_write_json(final / "meta.json", meta)


def load_trained(ctx: RunContext) -> torch.nn.Module:
    """Rebuild the trained model from ``train/final`` (the same modules it was trained with)."""
    ctx.require("train")
    final = ctx.stage_dir("train") / "final"
    meta = json.loads((final / "meta.json").read_text())
    with ctx.checked("train"):
        return load_final(final, meta, ctx.cfg.model.trust_remote_code)


def verify_final(final: Path, meta: dict) -> None:
    """Check ``final/model.safetensors`` against the sha256 in ``meta`` (an older run recorded none)."""
    digest = (meta.get("sha256") or {}).get("model.safetensors")
    if digest is not None:
        verify_file(final / "model.safetensors", digest, "trained model")


def _damaged(ctx: RunContext) -> str | None:
    """Why the finished stage's ``final/`` cannot be used (missing, or a failed checksum), or None."""
    final = ctx.stage_dir("train") / "final"
    try:
        verify_final(final, json.loads((final / "meta.json").read_text()))
    except (OSError, ValueError) as exc:  # IntegrityError is a ValueError, as is a corrupt meta.json
        return str(exc)
    return None


def load_final(final: Path, meta: dict, trust_remote_code: bool = False) -> torch.nn.Module:
    verify_final(final, meta)
    model = load_model(meta["student"], torch_dtype(meta["dtype"]), seed=meta["seed"],
                       trust_remote_code=trust_remote_code)
    if method_spec(meta["method"]).sparse:
        sparsify(model, meta["n"], meta["m"], meta["exclude"])
    if meta.get("slorb_group"):
        add_slorb(model, meta["slorb_group"], meta["slorb_trainable_projection"])
    load_model_tensors(model, load_file(str(final / "model.safetensors")), str(final / "model.safetensors"))
    model.eval()
    return model
