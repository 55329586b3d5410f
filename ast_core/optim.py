"""AdamW with the annealed SR-STE decay of AST, and the schedules that drive it.

The optimizer is AdamW (decoupled weight decay, torch's exact formula) plus,
for every parameter that has an N:M mask ``m``, a decay that pulls the
*masked-out* weights towards zero (docs/ARCHITECTURE.md "The method", paper eq. 3 in Adam form):

    W  ← W · (1 − lr·wd)                                  (decoupled weight decay, first)
    m̃  ← β1·m̃ + (1−β1)·g                                  (loss gradient only)
    d  = λ · (1 − m) ⊙ W                                  (SR-STE decay, λ = group["sparse_decay"])
    u  = m̃ + d
    v  ← β2·v + (1−β2)·s²        s = g + d  ("gradient", default) or s = u ("update")
    W  ← W − lr/(1−β1^t) · u / (sqrt(v)/sqrt(1−β2^t) + eps)

Why the decay stays out of the first moment: it acts on the current weights
at once instead of lagging behind them through the momentum (as in the
official AST code). The second moment defaults to the raw per-step direction
``g + d`` so that with λ = 0 the update *is* ``torch.optim.AdamW`` on every
parameter, masked or not (the naive-retraining baseline then shares this code
path). ``second_moment="update"`` tracks ``u²`` instead, which is what the
official code does; there a masked parameter with λ = 0 is *not* AdamW (its
``v`` follows the squared momentum). The official code also inverts an int
mask with ``~`` (giving −1/−2), which turns the decay into growth; masks here
must be ``torch.bool`` and the constructor refuses anything else.

The mask tensors are the :class:`~ast_core.sparse.SparseLinear` ``mask``
buffers themselves; mask refresh updates them in place, so the optimizer sees
the new masks without being told. Under FSDP (:mod:`ast_core.sharding`) a
parameter is a row shard; the update runs on that shard with the same rows of
the whole mask (a view, so a refresh still reaches it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from . import sharding
from .sparse import sparse_layers

SECOND_MOMENT_MODES = ("gradient", "update")


class ASTAdamW(torch.optim.Optimizer):
    """AdamW + annealed SR-STE decay on masked-out weights (see the module docstring).

    Param groups may carry ``weight_decay`` and ``sparse_decay`` (λ, default
    0.0); the training loop sets ``group["sparse_decay"] = λ(t)`` each step.
    State per parameter: ``step`` (float32 scalar tensor, as torch's AdamW),
    ``exp_avg``, ``exp_avg_sq`` — tensors only, so ``state_dict()["state"]``
    can be written to safetensors and a torch AdamW state loads here and back.
    """

    def __init__(self, params: Iterable, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1,
                 masks: dict[nn.Parameter, torch.Tensor] | None = None,
                 second_moment: str = "gradient") -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if second_moment not in SECOND_MOMENT_MODES:
            raise ValueError(f"second_moment must be one of {SECOND_MOMENT_MODES}, got {second_moment!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, sparse_decay=0.0,
                        second_moment=second_moment)
        super().__init__(params, defaults)
        self.masks: dict[nn.Parameter, torch.Tensor] = {}
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        for p, mask in (masks or {}).items():
            if mask.dtype != torch.bool:
                raise TypeError(f"mask for a parameter of shape {tuple(p.shape)} has dtype {mask.dtype}; "
                                "masks must be torch.bool (`~` on an int mask gives -1/-2 and turns "
                                "the decay into growth)")
            if mask.shape != p.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != parameter shape {tuple(p.shape)}")
            if id(p) not in owned:
                raise ValueError(f"a masked parameter of shape {tuple(p.shape)} is not in any param group")
            self.masks[p] = mask

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            lam = float(group.get("sparse_decay", 0.0))
            mode = group.get("second_moment", "gradient")
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ASTAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                mask = self.masks.get(p)
                if sharding.is_sharded(p):  # FSDP: this rank's rows of p, its state and its mask
                    mask = None if mask is None else sharding.local_rows(p, mask)
                    state = {k: sharding.local(v) for k, v in state.items()}
                    p, grad = p.to_local(), sharding.local(p.grad)
                else:
                    grad = p.grad
                _ast_adamw_update(p, grad, state, mask, self._scratch_for(p),
                                  lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, lam=lam, mode=mode)
        return loss

    def _scratch_for(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two work buffers shaped like ``p``, views of flat buffers reused by every
        parameter of the same device/dtype: a step allocates nothing (fresh large
        allocations are page faults, which cost more than the arithmetic on a CPU).
        Not optimizer state: never saved."""
        scratch = self.__dict__.setdefault("_scratch", {})
        key = (p.device, p.dtype)
        flat = scratch.get(key)
        if flat is None or flat.shape[1] < p.numel():
            flat = torch.empty(2, p.numel(), device=p.device, dtype=p.dtype)
            scratch[key] = flat
        n = p.numel()
        return flat[0, :n].view(p.shape), flat[1, :n].view(p.shape)


def _ast_adamw_update(p: torch.Tensor, grad: torch.Tensor, state: dict, mask: torch.Tensor | None,
                      scratch: tuple[torch.Tensor, torch.Tensor], *, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float, lam: float, mode: str) -> None:
    """One parameter's update. The op sequence mirrors torch's single-tensor AdamW
    (``lerp_`` for m̃, ``mul_().addcmul_()`` for v, ``sqrt(v) / sqrt(bc2) + eps``),
    so the unmasked / λ = 0 path is torch's arithmetic, rounding included."""
    exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
    buf_a, buf_b = scratch
    step_t += 1
    if weight_decay != 0:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    numer = exp_avg
    if mask is None or (lam == 0.0 and mode == "gradient"):
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        # d = (1 − m) ⊙ W, from the weights after decoupled decay (as the official code),
        # computed as W − W·m with the mask read as 0/1 bytes: float ops on a bool
        # tensor take a slow path (where/masked_fill cost ~10× an add here).
        decay = buf_a.copy_(mask.view(torch.uint8))
        torch.mul(p, decay, out=decay)
        torch.sub(p, decay, out=decay)
        if mode == "gradient":
            s = torch.add(grad, decay, alpha=lam, out=buf_b)  # s = g + λd
            exp_avg_sq.mul_(beta2).addcmul_(s, s, value=1 - beta2)
            numer = torch.add(exp_avg, decay, alpha=lam, out=buf_a)  # u = m̃ + λd
        else:
            numer = torch.add(exp_avg, decay, alpha=lam, out=buf_a)
            exp_avg_sq.mul_(beta2).addcmul_(numer, numer, value=1 - beta2)
    step = float(step_t.item())
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = torch.sqrt(exp_avg_sq, out=buf_b).div_(bias_correction2_sqrt).add_(eps)
    p.addcdiv_(numer, denom, value=-(lr / bias_correction1))


def build_param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Two groups: ≥2-D params (matrices, embeddings) get decoupled weight decay,
    biases and norm scales (1-D) get none — the usual GPT recipe, and what AST uses.
    Shared (tied) parameters appear once; frozen ones are left out."""
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicates tied weights
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, name="decay"),
              dict(params=no_decay, weight_decay=0.0, name="no_decay")]
    return [g for g in groups if g["params"]]


def masks_for(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """``{layer.weight: layer.mask}`` for every SparseLinear — the buffers themselves,
    not copies, so in-place mask refresh reaches the optimizer. Build it after
    ``model.to(device)``: moving a module replaces its buffers."""
    return {layer.weight: layer.mask for _, layer in sparse_layers(model)}


def decay_lambda(step: int, lambda_max: float, t0: int) -> float:
    """λ(t) = λ_max · min(1, t / T0): the annealed SR-STE decay (linear ramp, then hold).

    Starting weak lets the mask move early while the weights are still close
    to dense; T0 = 0 means full λ from step 0."""
    if t0 <= 0:
        return float(lambda_max)
    return float(lambda_max) * min(1.0, max(step, 0) / t0)


def cosine_lr(step: int, total_steps: int, peak_lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr``.

    Warm-up: lr = peak · (step + 1) / warmup for step < warmup (step 0 is already
    non-zero, the last warm-up step reaches peak). Then
    lr = min + ½(peak − min)(1 + cos(π·p)), p = (step − warmup)/(total − warmup)
    clamped to [0, 1]: it equals ``min_lr`` at ``total_steps`` and stays there
    beyond; after warm-up it is never below ``min_lr``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = total_steps - warmup_steps
    if span <= 0:
        return min_lr
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    lr = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    return max(lr, min_lr)


@dataclass
class ASTSchedule:
    """The two per-step schedules of AST: learning rate and decay strength λ(t)."""
    lambda_max: float
    t0: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __post_init__(self) -> None:
        checks = [("lambda_max", self.lambda_max >= 0, "must be >= 0"),
                  ("t0", self.t0 >= 0, "must be >= 0"),
                  ("peak_lr", self.peak_lr > 0, "must be > 0"),
                  ("min_lr", 0 <= self.min_lr <= self.peak_lr, "must lie in [0, peak_lr]"),
                  ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                  ("total_steps", self.total_steps > 0, "must be > 0")]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"ASTSchedule.{name}={getattr(self, name)!r} {why}")

    def lr(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps)

    def lam(self, step: int) -> float:
        return decay_lambda(step, self.lambda_max, self.t0)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> tuple[float, float]:
        """Set ``lr`` and ``sparse_decay`` on every param group; returns (lr, λ) for logging."""
        lr, lam = self.lr(step), self.lam(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["sparse_decay"] = lam
        return lr, lam
