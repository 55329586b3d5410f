"""Mask refresh: recompute every N:M mask from the current dense weights.

AST recomputes the masks by magnitude every Δt optimizer steps (docs/ARCHITECTURE.md, "The method"),
which is how a pruned weight that the gradient keeps growing wins its place
back. The buffers are updated in place (``layer.mask.copy_``) so that the
optimizer, which holds the same tensors, decays the new masked-out set at once.

Score. The paper refreshes by magnitude (and finds it beats activation-aware
scores over 10k–40k steps). At a CPU budget of tens of steps that undoes a
Wanda initial mask at the first refresh (measured: 5–10 % of bits flip and
validation perplexity triples), so a refresh can instead use the Wanda score
|W|·‖x‖ with the column norms frozen from the calibration pass that chose the
initial mask (``column_scale``): the mask then keeps to the criterion it
started from, and no activations are collected during training.

The flip rate — the fraction of mask bits changed since the previous refresh
and since the initial mask — is the health signal: many flips early, then a
settling run (≈0.3% per refresh mid-run on GPT-2 in the paper).

Speed: the refresh runs every Δt steps over every sparse weight, so for 2:4 it
uses a six-comparison majority vote per group that gives exactly
``nm_mask(|W|, 2, 4)`` (tie-breaking included; the tests check it) at about
half the cost (SmolLM2-135M, one CPU thread: ~0.45 s vs ~0.8 s per refresh).
Other N:M patterns call ``nm_mask`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import sharding
from .masks import nm_mask
from .sparse import sparse_layers


@dataclass
class FlipStats:
    """Mask bits changed by one refresh, vs the previous and vs the initial masks.

    ``per_layer[name] = (changed_prev, changed_init)``. Without initial masks,
    ``changed_init`` is 0 everywhere. A swap inside one group flips 2 bits.
    """
    changed_prev: int
    changed_init: int
    total: int
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def rate_prev(self) -> float:
        return self.changed_prev / self.total if self.total else 0.0

    @property
    def rate_init(self) -> float:
        return self.changed_init / self.total if self.total else 0.0


def magnitude_nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4,
                      column_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly ``nm_mask(|W| · column_scale, n, m)`` (scores compared in float32, ties
    to the lower column); 2:4 takes the faster majority-vote path below.

    ``column_scale`` [in_features] (e.g. sqrt of the mean squared calibration
    activation: the Wanda score) weights each input column; None is plain magnitude.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    score = weight.detach().abs()
    if column_scale is not None:
        if column_scale.shape != (weight.shape[1],):
            raise ValueError(f"column scale has shape {tuple(column_scale.shape)}, "
                             f"expected ({weight.shape[1]},)")
        score = score * column_scale.to(weight.device, torch.float32).unsqueeze(0)
    if (n, m) != (2, 4):
        return nm_mask(score, n, m)
    if weight.shape[1] % 4:
        raise ValueError(f"weight must be 2-D with in_features divisible by 4, got {tuple(weight.shape)}")
    return _two_of_four(score.float())


def _majority(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (x & y) | (z & (x | y))


def _two_of_four(score: torch.Tensor) -> torch.Tensor:
    """2:4 by six pairwise comparisons: entry i is kept iff it wins at least 2 of its
    3 pairings, a majority vote (w_ij = s_i ≥ s_j for i < j: the lower index wins ties)."""
    rows, cols = score.shape
    s0, s1, s2, s3 = score.reshape(rows, cols // 4, 4).unbind(-1)
    w01, w02, w03 = s0 >= s1, s0 >= s2, s0 >= s3
    w12, w13, w23 = s1 >= s2, s1 >= s3, s2 >= s3
    keep = [_majority(w01, w02, w03), _majority(~w01, w12, w13),
            _majority(~w02, ~w12, w23), ~_majority(w03, w13, w23)]
    return torch.stack(keep, dim=-1).reshape(rows, cols)


def snapshot_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every SparseLinear mask by layer name (e.g. the initial masks)."""
    return {name: layer.mask.detach().clone() for name, layer in sparse_layers(model)}


@torch.no_grad()
def refresh_masks(model: nn.Module, initial: dict[str, torch.Tensor] | None = None,
                  column_scale: dict[str, torch.Tensor] | None = None) -> FlipStats:
    """Set every SparseLinear mask to ``nm_mask(|W|, layer.n, layer.m)`` in place
    (``|W| · column_scale[name]`` when scales are given: every layer needs one).

    Counts the bits that changed against the mask being replaced and, when
    ``initial`` is given, against the initial masks (same names as
    :func:`snapshot_masks`).
    """
    per_layer: dict[str, tuple[int, int]] = {}
    total = changed_prev = changed_init = 0
    for name, layer in sparse_layers(model):
        if column_scale is not None and name not in column_scale:
            raise KeyError(f"no refresh column scale for layer {name!r}")
        new = magnitude_nm_mask(sharding.full(layer.weight), layer.n, layer.m,
                                None if column_scale is None else column_scale[name])
        prev = int((layer.mask != new).sum())
        init = 0
        if initial is not None:
            if name not in initial:
                raise KeyError(f"no initial mask for layer {name!r}")
            init = int((initial[name].to(new.device) != new).sum())
        layer.mask.copy_(new)
        per_layer[name] = (prev, init)
        changed_prev += prev
        changed_init += init
        total += new.numel()
    return FlipStats(changed_prev, changed_init, total, per_layer)


@torch.no_grad()
def pruned_kept_ratio(model: nn.Module) -> float:
    """mean |W| over masked-out weights / mean |W| over kept weights, pooled over layers.

    The decay should drive this towards 0: masked weights that stay large are
    the ones that will flip back in at the next refresh.
    """
    kept_sum = kept_n = pruned_sum = pruned_n = 0.0
    for _, layer in sparse_layers(model):
        w = sharding.full(layer.weight.detach()).abs().float()
        mask = layer.mask
        total_sum = float(w.sum())
        k_sum = float(w[mask].sum())
        k_n = int(mask.sum())
        kept_sum += k_sum
        kept_n += k_n
        pruned_sum += total_sum - k_sum
        pruned_n += mask.numel() - k_n
    if kept_n == 0 or pruned_n == 0:
        return float("nan")
    kept_mean = kept_sum / kept_n
    return (pruned_sum / pruned_n) / kept_mean if kept_mean else float("nan")
