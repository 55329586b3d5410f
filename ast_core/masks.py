"""N:M masks: scores, selection and checks.

Convention everywhere in this package: a weight is ``[out_features, in_features]``
(``nn.Linear`` layout); for each output row the input columns form consecutive
groups of M, and N entries per group are kept (mask 1). 2:4 is the default and
the one with hardware support. Masks are ``torch.bool`` tensors of the weight's
shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` consecutive columns.

    Ties are broken deterministically towards the lower column index (a stable
    sort on the negated score), so equal scores always give the same mask.
    """
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    if score.dim() != 2:
        raise ValueError(f"score must be 2-D [out, in], got shape {tuple(score.shape)}")
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not divisible by M={m}")
    g = score.detach().float().reshape(rows, cols // m, m)
    # rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i}; keep rank < n. Ties go to the lower
    # column. The double loop runs over the M positions of a group (M² small vector ops over
    # all groups at once), several times faster on CPU than a stable argsort over size-M rows.
    cols_ = [g[..., i] for i in range(m)]
    keep = torch.empty_like(g, dtype=torch.bool)
    for i in range(m):
        rank = torch.zeros_like(cols_[i], dtype=torch.int8)
        for j in range(m):
            if j != i:
                rank += (cols_[j] >= cols_[i]) if j < i else (cols_[j] > cols_[i])
        keep[..., i] = rank < n
    return keep.reshape(rows, cols)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the refresh score (the paper finds it beats activation-aware scores there)."""
    return weight.detach().abs()


def wanda_score(weight: torch.Tensor, act_sq_mean: torch.Tensor) -> torch.Tensor:
    """|W_ij| · sqrt(mean over tokens of x_j²) (Wanda, Sun et al. 2023)."""
    if act_sq_mean.shape != (weight.shape[1],):
        raise ValueError(f"activation statistic has shape {tuple(act_sq_mean.shape)}, "
                         f"expected ({weight.shape[1]},)")
    return weight.detach().abs() * act_sq_mean.to(weight.device, torch.float32).sqrt().unsqueeze(0)


def is_nm(weight_or_mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of ``m`` has at most ``n`` non-zeros (exactly N:M-compatible).

    A group with fewer non-zeros (an exact zero among the kept weights) is
    still valid 2:4 for the hardware, so the check is "at most N".
    """
    return bool(violations(weight_or_mask, n, m) == 0)


def violations(weight_or_mask: torch.Tensor, n: int = 2, m: int = 4) -> int:
    """Number of groups of ``m`` holding more than ``n`` non-zeros."""
    t = weight_or_mask.detach()
    if t.dim() != 2 or t.shape[1] % m:
        return -1 if t.dim() != 2 else int(t.numel())
    nz = (t != 0).reshape(t.shape[0], t.shape[1] // m, m).sum(-1)
    return int((nz > n).sum())


def mask_is_exact(mask: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every group of the boolean mask keeps exactly ``n``."""
    if mask.dim() != 2 or mask.shape[1] % m:
        return False
    per_group = mask.reshape(mask.shape[0], mask.shape[1] // m, m).sum(-1)
    return bool((per_group == n).all())


@dataclass
class NMReport:
    """Result of checking a whole model: which layers break the pattern."""
    n: int
    m: int
    checked: list[str]
    offending: dict[str, int]  # layer name -> number of violating groups

    @property
    def ok(self) -> bool:
        return bool(self.checked) and not self.offending

    def __str__(self) -> str:
        if self.ok:
            return f"all {len(self.checked)} sparse layers are exactly {self.n}:{self.m}"
        if not self.checked:
            return "no sparse layers found"
        bad = ", ".join(f"{k} ({v} groups)" for k, v in list(self.offending.items())[:10])
        return f"{len(self.offending)} of {len(self.checked)} layers violate {self.n}:{self.m}: {bad}"


def check_weights(named_weights: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> NMReport:
    """Check a mapping name -> effective weight ([out, in]) for the N:M pattern."""
    offending: dict[str, int] = {}
    for name, w in named_weights.items():
        bad = violations(w, n, m)
        if bad:
            offending[name] = bad
    return NMReport(n, m, list(named_weights), offending)


def flip_count(old: torch.Tensor, new: torch.Tensor) -> int:
    """Number of mask bits that differ."""
    return int((old != new).sum())
