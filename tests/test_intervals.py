"""Bootstrap intervals of perplexity, on data whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ast_core.intervals import mean_sd, paired_diff_interval, ppl_interval, ppl_ratio_interval


def test_identical_windows_give_a_point_interval() -> None:
    lo, hi = ppl_interval([2.0] * 50)
    assert lo == pytest.approx(math.exp(2.0)) and hi == pytest.approx(math.exp(2.0))


def test_interval_matches_the_normal_theory_width_and_covers_the_truth() -> None:
    """Window losses ~ N(3, 0.5²), n = 400: the 95% interval of the mean log-ppl is 3 ± 1.96·0.5/20."""
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for rep in range(40):
        x = rng.normal(3.0, 0.5, size=400)
        lo, hi = ppl_interval(x, seed=rep)
        covered += math.log(lo) <= 3.0 <= math.log(hi)
        widths.append(math.log(hi) - math.log(lo))
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.5 / 20, rel=0.1)
    assert covered >= 34  # 95% nominal coverage: at least 34 of 40 (binomial 1st percentile ~ 35)


def test_paired_ratio_is_tighter_than_the_separate_intervals_and_finds_a_known_shift() -> None:
    """b = a + 0.02 on every window (plus tiny noise): ratio ppl_b/ppl_a = e^0.02, tightly."""
    rng = np.random.default_rng(1)
    a = rng.normal(4.0, 0.6, size=200)
    b = a + 0.02 + rng.normal(0, 0.005, size=200)
    ratio, lo, hi = ppl_ratio_interval(b, a)
    assert ratio == pytest.approx(math.exp(0.02), rel=2e-3) and lo > 1.0 and hi < math.exp(0.03)
    a_lo, a_hi = ppl_interval(a)
    assert (hi - lo) < 0.1 * (a_hi - a_lo) / math.exp(4.0)  # pairing removes the window-to-window spread


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 windows"):
        ppl_interval([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        ppl_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="differ in number"):
        ppl_ratio_interval([1.0, 2.0], [1.0, 2.0, 3.0])
    assert mean_sd([1.0]) == (1.0, None) and mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_paired_accuracy_difference_finds_a_known_gap_and_zero_when_identical() -> None:
    """Two models on 1,000 yes/no items: b is right wherever a is, plus on 50 more -> +0.05 exactly."""
    rng = np.random.default_rng(2)
    a = (rng.random(1000) < 0.6).astype(float)
    b = a.copy()
    b[np.flatnonzero(a == 0)[:50]] = 1.0
    diff, lo, hi = paired_diff_interval(b, a)
    assert diff == pytest.approx(0.05) and 0.03 < lo < 0.05 < hi < 0.07
    assert paired_diff_interval(a, a) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="differ in number"):
        paired_diff_interval(a, a[:-1])
