"""N:M masks: exact structure, ties, general N:M, the checker."""

from __future__ import annotations

import pytest
import torch

from ast_core.masks import (check_weights, flip_count, is_nm, magnitude_score, mask_is_exact, nm_mask, violations,
                            wanda_score)


def _reference_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-group Python reference: keep the n largest, ties to the lower column."""
    out = torch.zeros_like(score, dtype=torch.bool)
    for r in range(score.shape[0]):
        for g in range(0, score.shape[1], m):
            vals = score[r, g:g + m].tolist()
            order = sorted(range(m), key=lambda i: (-vals[i], i))
            for i in order[:n]:
                out[r, g + i] = True
    return out


@pytest.mark.parametrize("shape", [(1, 4), (3, 8), (17, 64), (64, 36)])
def test_exactly_two_of_every_four_are_kept(shape) -> None:
    w = torch.randn(shape)
    mask = nm_mask(magnitude_score(w))
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert mask_is_exact(mask, 2, 4)
    assert torch.equal(mask, _reference_mask(w.abs(), 2, 4))
    kept = (w.abs() * mask).reshape(shape[0], -1, 4)
    dropped = (w.abs() * ~mask).reshape(shape[0], -1, 4)
    assert bool((kept.max(-1).values >= dropped.max(-1).values).all())


def test_ties_are_deterministic_and_go_to_lower_columns() -> None:
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 5.0, 2.0, 2.0, 2.0]])
    mask = nm_mask(score)
    assert mask.tolist() == [[True, True, False, False, True, True, False, False, True, True, False, False]]
    ints = torch.randint(0, 3, (32, 32)).float()
    assert torch.equal(nm_mask(ints), _reference_mask(ints, 2, 4))


def test_negative_values_use_magnitude() -> None:
    w = torch.tensor([[-5.0, 1.0, 4.0, -0.5]])
    assert nm_mask(magnitude_score(w)).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("n, m", [(1, 4), (2, 8), (4, 8), (3, 4), (1, 2)])
def test_general_n_of_m(n: int, m: int) -> None:
    w = torch.randn(10, 4 * m)
    mask = nm_mask(w.abs(), n, m)
    assert mask_is_exact(mask, n, m)
    assert torch.equal(mask, _reference_mask(w.abs(), n, m))


def test_bad_shapes_and_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        nm_mask(torch.randn(2, 6))
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.randn(2, 8), 4, 4)


def test_checker_catches_a_violated_group() -> None:
    w = torch.randn(8, 16)
    good = w * nm_mask(w.abs())
    assert is_nm(good) and violations(good) == 0
    bad = good.clone()
    bad[3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not is_nm(bad) and violations(bad) == 1
    report = check_weights({"ok": good, "broken": bad})
    assert not report.ok and report.offending == {"broken": 1} and "broken" in str(report)
    assert check_weights({"ok": good}).ok


def test_wanda_score_weights_columns_by_activation_norm() -> None:
    w = torch.ones(2, 4)
    act = torch.tensor([1.0, 100.0, 4.0, 0.0])
    assert torch.equal(wanda_score(w, act), torch.tensor([[1.0, 10.0, 2.0, 0.0]] * 2))
    assert nm_mask(wanda_score(w, act)).tolist() == [[False, True, True, False]] * 2
    with pytest.raises(ValueError, match="shape"):
        wanda_score(w, torch.ones(3))


def test_flip_count() -> None:
    a = torch.tensor([True, False, True, False])
    assert flip_count(a, torch.tensor([False, True, True, False])) == 2
