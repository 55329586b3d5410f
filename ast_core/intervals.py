"""Confidence intervals for perplexity, by bootstrap over evaluation windows.

Perplexity is ``exp(mean_w nll_w)`` over windows of equal length, so its
sampling error comes from which windows were scored. Resampling the windows
with replacement (``n_boot`` times, a fixed seed) and taking percentiles of
``exp(mean)`` gives a 95% interval that needs no normality assumption.

Two models scored on the *same* windows are compared by a paired bootstrap
of the per-window differences: the windows that are hard for one are hard for
the other, so the paired interval of the ratio ``ppl_a / ppl_b`` is much
tighter than two separate intervals suggest.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


def _resampled_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    return values[idx].mean(axis=1)


def _check(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or len(arr) < 2:
        raise ValueError(f"{what}: a bootstrap needs at least 2 windows, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: non-finite per-window losses")
    return arr


def ppl_interval(window_nll: Sequence[float], n_boot: int = N_BOOT, level: float = LEVEL,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``exp(mean(window_nll))`` (equal-length windows)."""
    arr = _check(window_nll, "ppl_interval")
    means = _resampled_means(arr, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return math.exp(lo), math.exp(hi)


def _paired(a: Sequence[float], b: Sequence[float], what: str, unit: str, n_boot: int, level: float,
            seed: int) -> tuple[float, float, float]:
    """``mean(a - b)`` and the percentile bootstrap interval of it, resampling the paired ``unit``s."""
    x, y = _check(a, what), _check(b, what)
    if x.shape != y.shape:
        raise ValueError(f"paired {unit} differ in number: {len(x)} vs {len(y)}")
    diff = x - y
    means = _resampled_means(diff, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def ppl_ratio_interval(nll_a: Sequence[float], nll_b: Sequence[float], n_boot: int = N_BOOT,
                       level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """``ppl_a / ppl_b`` and its paired-bootstrap interval, both scored on the same windows."""
    d, lo, hi = _paired(nll_a, nll_b, "ppl_ratio_interval", "windows", n_boot, level, seed)
    return math.exp(d), math.exp(lo), math.exp(hi)


def paired_diff_interval(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT,
                         level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """``mean(a) - mean(b)`` and its paired-bootstrap interval, over items both were scored on
    (e.g. per-question accuracy of two models on the same questions)."""
    return _paired(a, b, "paired_diff_interval", "items", n_boot, level, seed)


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)
