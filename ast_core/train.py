"""The AST training loop, readable top to bottom.

One step (docs/ARCHITECTURE.md, "The method"):

1. lr(t) from the cosine schedule, λ(t) = λ_max·min(1, t/T0) into the optimizer;
2. forward the student with W ⊙ m (STE), CE on next tokens;
3. KD: α·KL(teacher ‖ student)·T² + (1−α)·CE, with the teacher's targets read
   from the cache (or an online teacher);
4. backward, clip, AST-AdamW step (decay λ(t)·(1−m)⊙W enters the second moment);
5. every Δt steps recompute the masks by magnitude and log the flip rates;
6. every N steps an atomic, resumable checkpoint;
7. every ``eval_every`` steps (when validation blocks are given) the mean
   next-token loss on that fixed slice, for perplexity-vs-tokens curves.

Methods (:mod:`ast_core.recipe`): ``naive`` = fixed mask, CE only, λ=0;
``fixed-kd`` = fixed mask, λ=0, KD; ``ast-naive`` = adaptive mask + decay + KD;
``ast-boosted`` = ast-naive + SLoRB (attached by the caller).
The loop is deterministic on CPU: resuming from a checkpoint gives bitwise the
same weights as an uninterrupted run. Under ``torchrun`` (``dist``) each rank
trains on its slice of every global batch with DDP-averaged gradients and only
rank 0 writes (:mod:`ast_core.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .distributed import DistEnv, barrier, check_masks_agree, mean_across, my_blocks
from .checkpoint import (latest_checkpoint, load_model_tensors, load_resumable, rng_state, state_dict_tensors,
                         save_checkpoint, set_rng_state)
from .distill import kd_combine, kl_from_targets, kl_full, squarehead_loss
from .optim import ASTAdamW, ASTSchedule, build_param_groups, masks_for
from . import sharding
from .progress import bar as progress_bar
from .refresh import FlipStats, pruned_kept_ratio, refresh_masks, snapshot_masks
from .errors import ASTError


class TrainingDiverged(ASTError, RuntimeError):
    """A NaN/inf loss or gradient; names the step and the last good checkpoint."""


class LoopConfig(Protocol):
    """What the loop reads from the validated ``train`` section (tasks.config.TrainConfig)."""
    method: str
    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    lambda_max: float
    t0: int
    refresh_every: int
    wanda_refresh: bool
    parallel: str
    second_moment: str
    kd_alpha: float
    temperature: float
    squarehead: bool
    squarehead_weight: float
    checkpoint_every: int
    log_every: int
    eval_every: int
    uses_kd: bool
    adaptive: bool


class BlockOrder:
    """Deterministic, resumable order over training blocks: one permutation per epoch.

    The data position is a pure function of (seed, step), so resuming needs
    nothing but the step number.
    """

    def __init__(self, n_blocks: int, seed: int) -> None:
        if n_blocks < 1:
            raise ValueError("no training blocks")
        self.n, self.seed = n_blocks, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def ids(self, start: int, count: int) -> np.ndarray:
        pos = np.arange(start, start + count)
        return np.array([self._perm(int(p // self.n))[p % self.n] for p in pos], dtype=np.int64)


class TeacherSource(Protocol):
    def kl(self, student_logits: torch.Tensor, block_ids: np.ndarray, input_ids: torch.Tensor,
           temperature: float) -> torch.Tensor: ...


class CachedTeacher:
    """KD targets read from a :class:`ast_core.teacher_cache.TeacherCache`."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def kl(self, student_logits, block_ids, input_ids, temperature):
        targets = {k: v.to(student_logits.device) for k, v in self.cache.targets(block_ids).items()}
        return kl_from_targets(student_logits, targets, self.cache.format, temperature)


class OnlineTeacher:
    """Runs the dense teacher on every batch (the reference the cache must match)."""

    def __init__(self, model: torch.nn.Module, want_hidden: bool = False) -> None:
        self.model = model.eval()
        self.want_hidden = want_hidden
        self.last_hidden: tuple[torch.Tensor, ...] | None = None

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids, output_hidden_states=self.want_hidden)
        self.last_hidden = out.hidden_states if self.want_hidden else None
        return out.logits.float()

    def kl(self, student_logits, block_ids, input_ids, temperature):
        return kl_full(student_logits, self.logits(input_ids), temperature)


@dataclass
class StepLog:
    step: int
    loss: float
    ce: float
    kl: float
    lr: float
    lam: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    flip_rate_prev: float | None = None
    flip_rate_init: float | None = None
    pruned_kept_ratio: float | None = None
    squarehead: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainResult:
    steps: int
    tokens: int
    last_flip: FlipStats | None
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    fell_back: list[str] = field(default_factory=list)  # damaged newer checkpoints a resume skipped, and why


def causal_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (position t predicts token t+1)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           input_ids[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 8) -> float:
    """Mean next-token CE over fixed validation blocks (every token weighted alike).

    Runs in eval mode and restores the previous mode; it draws no random
    numbers, so a run with validation stays bitwise equal to one without.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(blocks[i:i + batch_size].astype(np.int64)).to(device)
        logits = model(ids).logits
        n = ids[:, 1:].numel()
        total += float(causal_ce(logits, ids)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig) -> ASTAdamW:
    """AST-AdamW over the model. The masks go to the optimizer when the method adapts them, and
    also with ``second_moment: update`` on a fixed mask: there λ = 0, but v still tracks u² = m̃²
    on the sparse weights, so a fixed-mask run is the exact control of an adaptive run with that
    form (without the masks it would silently be AdamW)."""
    masks = masks_for(model) if cfg.adaptive or cfg.second_moment == "update" else None
    return ASTAdamW(build_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                    eps=cfg.eps, weight_decay=cfg.weight_decay, masks=masks, second_moment=cfg.second_moment)


def make_schedule(cfg: LoopConfig) -> ASTSchedule:
    return ASTSchedule(lambda_max=cfg.lambda_max if cfg.adaptive else 0.0, t0=cfg.t0, peak_lr=cfg.lr,
                       min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps)


def step_loss(model: torch.nn.Module, input_ids: torch.Tensor, block_ids: np.ndarray, cfg: LoopConfig,
              teacher: TeacherSource | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of one micro-batch: (loss, CE, KL, SquareHead), the last two 0 when unused.

    loss = CE for CE-only methods; α·KL·T² + (1−α)·CE with distillation (+ the weighted
    SquareHead term when asked for and the teacher is online).
    """
    out = model(input_ids, output_hidden_states=cfg.squarehead)
    ce = causal_ce(out.logits, input_ids)
    zero = torch.zeros((), device=input_ids.device)
    loss, kl, sq = ce, zero, zero
    if cfg.uses_kd:
        kl = teacher.kl(out.logits, block_ids, input_ids, cfg.temperature)
        loss = kd_combine(ce, kl, cfg.kd_alpha)
        if cfg.squarehead and isinstance(teacher, OnlineTeacher) and teacher.last_hidden:
            sq = squarehead_loss(list(out.hidden_states[1:]), list(teacher.last_hidden[1:]))
            loss = loss + cfg.squarehead_weight * sq
    return loss, ce, kl, sq


def _parallel(student: torch.nn.Module, cfg: LoopConfig, env: DistEnv,
              device: torch.device) -> tuple[torch.nn.Module, bool]:
    """What the loop calls forward on, and whether the student is sharded: itself (one process),
    DDP-wrapped (replicas, gradients all-reduced) or sharded in place by rows (FSDP2)."""
    if env.enabled and cfg.parallel == "fsdp":  # rows of every parameter sharded across ranks
        sharding.shard_model(student, device)
        return student, True
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(student, broadcast_buffers=False,
                                       device_ids=[device] if device.type == "cuda" else None), False
    return student, False


def _restore(ckpt: Any, student: torch.nn.Module, optimizer: ASTAdamW, fsdp: bool, device: torch.device,
             wanda_refresh: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Weights, optimizer state and RNG from ``ckpt``; returns (initial masks, refresh column scales)."""
    load_model_tensors(student, ckpt.model, str(ckpt.path / "model.safetensors"))
    optimizer.load_state_dict(sharding.shard_optimizer_state(ckpt.optimizer, optimizer) if fsdp
                              else ckpt.optimizer)
    initial_masks = {k.removeprefix("initial_mask."): v.to(device) for k, v in ckpt.extra.items()
                     if k.startswith("initial_mask.")}
    refresh_scale = {k.removeprefix("refresh_scale."): v.to(device) for k, v in ckpt.extra.items()
                     if k.startswith("refresh_scale.")} or None
    if wanda_refresh and refresh_scale is None:
        raise ValueError(f"{ckpt.path} holds no refresh column scales: it was trained with "
                         "magnitude refresh and cannot resume with refresh_score 'wanda'")
    set_rng_state(ckpt.extra)
    return initial_masks, refresh_scale


def train(student: torch.nn.Module, blocks: np.ndarray, cfg: LoopConfig, *, seed: int,
          teacher: TeacherSource | None, checkpoint_dir: Path, resume: bool = False,
          on_step: Callable[[StepLog], None] | None = None, progress: bool = True,
          stop_after: int | None = None, val_blocks: np.ndarray | None = None,
          dist: DistEnv | None = None,
          refresh_scale: dict[str, torch.Tensor] | None = None) -> TrainResult:
    """Train ``student`` (already sparsified, masks initialised) on ``blocks`` [N, L].

    ``val_blocks`` with ``cfg.eval_every > 0``: validation loss/perplexity at
    step 0 (the starting point of the curve), every ``eval_every`` steps and at
    the last step, recorded in the history (rank 0 only).

    ``dist``: this process's rank under ``torchrun``; the student must already
    be on its device (inputs follow the student's device). ``cfg.batch_size``
    is the global batch; each rank takes its slice.

    ``refresh_scale``: with ``cfg.wanda_refresh``, per-layer
    input-column weights for the mask refresh (sqrt of the mean squared
    calibration activation, frozen at the initial mask). Saved in every
    checkpoint; a resume takes them from there.

    ``stop_after`` ends the call early after that many steps of this call (used
    to simulate an interruption); the checkpoint logic is the same as a crash.
    """
    if cfg.uses_kd and teacher is None:
        raise ValueError(f"method {cfg.method} needs a teacher (cache or online)")
    env = dist or DistEnv()
    device = next(student.parameters()).device
    student.train()
    model, fsdp = _parallel(student, cfg, env, device)
    wanda_refresh = cfg.wanda_refresh
    optimizer = make_optimizer(student, cfg)
    schedule = make_schedule(cfg)
    order = BlockOrder(len(blocks), seed)
    initial_masks = snapshot_masks(student)
    start, tokens, resumed_from = 0, 0, None
    fell_back: list[str] = []
    history: list[dict[str, float]] = []

    ckpt, skipped = load_resumable(checkpoint_dir) if resume else (None, [])
    if ckpt is not None:
        initial_masks, refresh_scale = _restore(ckpt, student, optimizer, fsdp, device, wanda_refresh)
        start, tokens = ckpt.state["step"], ckpt.state["tokens"]
        history = ckpt.state.get("history", [])
        resumed_from = start
        fell_back = skipped  # newer checkpoints that were damaged, and why
    if wanda_refresh and refresh_scale is None:  # a fresh start (or nothing to resume) must bring them
        raise ValueError("refresh_score 'wanda' needs refresh_scale (the calibration column norms)")

    def checkpoint(step: int) -> Path:
        path = checkpoint_dir / f"step_{step:06d}"
        # FSDP: every rank takes part in gathering the full state; rank 0 writes it
        weights = state_dict_tensors(student) if fsdp else student
        opt_state = sharding.full_optimizer_state(optimizer) if fsdp else optimizer
        if env.is_main:  # one writer; the others wait until the checkpoint is complete
            extra = {f"initial_mask.{k}": v for k, v in initial_masks.items()}
            extra.update({f"refresh_scale.{k}": v for k, v in (refresh_scale or {}).items()})
            extra.update(rng_state())
            path = save_checkpoint(checkpoint_dir, step, weights, opt_state, extra,
                                   {"tokens": tokens, "method": cfg.method, "history": history,
                                    "world_size": env.world_size})
        barrier(env)
        return path

    eval_every = getattr(cfg, "eval_every", 0)
    # rank 0 validates and records; under FSDP every rank must run the forward (it gathers weights)
    validate = (val_blocks is not None and len(val_blocks) > 0 and eval_every > 0 and (env.is_main or fsdp))
    if validate and start == 0:
        v = validation_loss(student, val_blocks)  # the curve's starting point: no training step, no loss
        if env.is_main:
            history.append({"step": 0, "tokens": 0, "val_loss": v, "val_ppl": math.exp(min(v, 700.0))})

    last_good = (ckpt.path if ckpt is not None
                 else latest_checkpoint(checkpoint_dir) if checkpoint_dir.exists() else None)
    last_flip: FlipStats | None = None
    bar = progress_bar(range(start, cfg.steps), progress and env.is_main, "train", total=cfg.steps,
                       initial=start)
    done_this_call = 0
    for step in bar:
        t_start = time.perf_counter()
        lr, lam = schedule.apply(optimizer, step)

        ce_sum = kl_sum = sq_sum = loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            ids = my_blocks(order.ids((step * cfg.grad_accum + micro) * cfg.batch_size, cfg.batch_size), env)
            input_ids = torch.from_numpy(blocks[ids].astype(np.int64)).to(device)
            last_micro = micro == cfg.grad_accum - 1
            sync = (model.no_sync() if env.enabled and not fsdp and not last_micro
                    else contextlib.nullcontext())
            with sync:  # DDP: only the last micro-step all-reduces the accumulated gradients
                loss, ce, kl, sq = step_loss(model, input_ids, ids, cfg, teacher)
                sq_sum += float(sq.detach())
                # the mean over ranks: a NaN on any rank stops every rank at the same step
                loss_val = mean_across([float(loss.detach())], env, device)[0]
                if not math.isfinite(loss_val):
                    raise TrainingDiverged(f"loss is {loss_val} at step {step + 1}; last good checkpoint: "
                                           f"{last_good or 'none (nothing was written)'}")
                (loss / cfg.grad_accum).backward()
            ce_sum += float(ce.detach())
            kl_sum += float(kl.detach())
            loss_sum += loss_val
            tokens += input_ids.numel() * env.world_size
        ce_sum, kl_sum, sq_sum = mean_across([ce_sum, kl_sum, sq_sum], env, device)

        grad_norm = float(sharding.full(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)))
        if not math.isfinite(grad_norm):
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {step + 1}; last good checkpoint: "
                                   f"{last_good or 'none (nothing was written)'}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        flip = None
        if cfg.adaptive and (step + 1) % cfg.refresh_every == 0:
            flip = last_flip = refresh_masks(student, initial_masks, refresh_scale if wanda_refresh else None)
            if env.enabled:  # one process has nothing to compare against
                check_masks_agree(snapshot_masks(student), env, step + 1)

        elapsed = time.perf_counter() - t_start  # the step itself; validation is not training time
        val = None
        if validate and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            val = validation_loss(student, val_blocks)
        n_tok = cfg.grad_accum * cfg.batch_size * blocks.shape[1]
        log = StepLog(step=step + 1, loss=loss_sum / cfg.grad_accum, ce=ce_sum / cfg.grad_accum,
                      kl=kl_sum / cfg.grad_accum, lr=lr, lam=lam, grad_norm=grad_norm, tokens=tokens,
                      tokens_per_s=n_tok / max(elapsed, 1e-9),
                      flip_rate_prev=flip.rate_prev if flip else None,
                      flip_rate_init=flip.rate_init if flip else None,
                      pruned_kept_ratio=pruned_kept_ratio(student) if flip else None,
                      squarehead=sq_sum / cfg.grad_accum if cfg.squarehead else None,
                      val_loss=val, val_ppl=math.exp(min(val, 700.0)) if val is not None else None)
        if (step + 1) % cfg.log_every == 0 or flip is not None or val is not None or step + 1 == cfg.steps:
            history.append(log.as_dict())
            if on_step and env.is_main:
                on_step(log)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{log.loss:.3f}", lr=f"{lr:.2e}", lam=f"{lam:.1e}",
                            flip=f"{last_flip.rate_prev:.2%}" if last_flip else "-")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            last_good = checkpoint(step + 1)
        done_this_call += 1
        if stop_after is not None and done_this_call >= stop_after:
            break

    student.eval()
    return TrainResult(steps=min(cfg.steps, start + done_this_call), tokens=tokens, last_flip=last_flip,
                       history=history, resumed_from=resumed_from, fell_back=fell_back)
