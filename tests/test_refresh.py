"""Mask refresh: exact flip counts, exact N:M masks, in-place buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ast_core.masks import mask_is_exact, nm_mask
from ast_core.refresh import FlipStats, magnitude_nm_mask, pruned_kept_ratio, refresh_masks, snapshot_masks
from ast_core.sparse import SparseLinear, sparse_layers


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = SparseLinear(8, 6, bias=False)
        self.down = SparseLinear(12, 4, bias=False)


def _staircase(rows: int, cols: int) -> torch.Tensor:
    """Every group of 4 is [4, 3, 2, 1] (alternating signs): the 2:4 mask keeps columns 0 and 1."""
    base = torch.tensor([4.0, -3.0, 2.0, -1.0]).repeat(rows, cols // 4)
    return base + 0.01 * torch.arange(rows).unsqueeze(1)


def _model() -> TwoLayers:
    model = TwoLayers()
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.weight.copy_(_staircase(*layer.weight.shape))
            layer.set_mask(nm_mask(layer.weight.abs()))
    return model


def _promote(layer: SparseLinear, row: int, group: int) -> None:
    """Make entry 2 of a group the largest: entry 1 drops out, so 2 bits flip."""
    with torch.no_grad():
        layer.weight[row, 4 * group + 2] = 10.0


def _restore(layer: SparseLinear, row: int, group: int) -> None:
    with torch.no_grad():
        layer.weight[row, 4 * group + 2] = 2.0 + 0.01 * row


def test_flip_counts_against_previous_and_initial_masks_are_exact():
    model = _model()
    initial = snapshot_masks(model)
    assert refresh_masks(model, initial).changed_prev == 0  # magnitude masks are a fixed point

    moved_up = [(0, 0), (3, 1), (5, 0)]
    for row, grp in moved_up:
        _promote(model.up, row, grp)
    _promote(model.down, 2, 2)
    stats = refresh_masks(model, initial)
    assert stats.per_layer == {"up": (6, 6), "down": (2, 2)}
    assert (stats.changed_prev, stats.changed_init) == (8, 8)
    assert stats.total == 6 * 8 + 4 * 12
    assert stats.rate_prev == pytest.approx(8 / 96)

    # Move one group back (2 flips vs previous, 0 vs initial) and two new ones (4 and 4).
    _restore(model.up, 0, 0)
    _promote(model.up, 1, 1)
    _promote(model.up, 4, 0)
    stats = refresh_masks(model, initial)
    assert stats.per_layer == {"up": (6, 8), "down": (0, 2)}
    assert (stats.changed_prev, stats.changed_init, stats.total) == (6, 10, 96)
    assert stats.rate_init == pytest.approx(10 / 96)


def test_refresh_writes_exact_2_4_masks_into_the_same_buffers():
    torch.manual_seed(1)
    model = TwoLayers()
    for _, layer in sparse_layers(model):
        nn.init.normal_(layer.weight)
    buffers = {name: layer.mask for name, layer in sparse_layers(model)}
    ptrs = {name: layer.mask.data_ptr() for name, layer in sparse_layers(model)}
    stats = refresh_masks(model)
    for name, layer in sparse_layers(model):
        assert layer.mask is buffers[name] and layer.mask.data_ptr() == ptrs[name]
        assert mask_is_exact(layer.mask, 2, 4)
        assert torch.equal(layer.mask, nm_mask(layer.weight.detach().abs(), 2, 4))
    assert stats.changed_init == 0 and stats.changed_prev == stats.total // 2  # all-ones → 2:4


def test_refresh_uses_each_layer_pattern():
    layer = SparseLinear(16, 3, bias=False, n=2, m=8)
    nn.init.normal_(layer.weight)
    model = nn.Sequential(layer)
    refresh_masks(model)
    assert mask_is_exact(layer.mask, 2, 8)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (4, 16)])
def test_magnitude_mask_equals_nm_mask_including_ties(n, m):
    g = torch.Generator().manual_seed(n * 100 + m)
    dense = torch.randn(33, 4 * m, generator=g)
    ties = torch.randint(-2, 3, (33, 4 * m), generator=g).float()  # many equal magnitudes, ± pairs
    for w in (dense, ties, torch.zeros(5, m)):
        assert torch.equal(magnitude_nm_mask(w, n, m), nm_mask(w.abs(), n, m))


def test_two_of_four_path_compares_in_float32_like_nm_mask():
    # float64 would keep columns 2, 3; in float32 columns 1-3 tie and the lower two win
    w = torch.tensor([[0.5, 1.0, 1.0 + 1e-12, 1.0 + 2e-12]], dtype=torch.float64)
    assert magnitude_nm_mask(w).tolist() == [[False, True, True, False]]
    assert torch.equal(magnitude_nm_mask(w), nm_mask(w.abs()))


def test_refresh_without_initial_reports_zero_initial_flips_and_rejects_missing_names():
    model = _model()
    _promote(model.up, 0, 0)
    stats = refresh_masks(model)
    assert isinstance(stats, FlipStats) and stats.changed_prev == 2 and stats.changed_init == 0
    with pytest.raises(KeyError, match="down"):
        refresh_masks(model, {"up": model.up.mask.clone()})


def test_pruned_kept_ratio_on_known_weights():
    model = _model()
    # up: kept |4|,|3| → mean 3.5+r, pruned |2|,|1| → 1.5+r; both layers pooled.
    expected_kept, expected_pruned = [], []
    for _, layer in sparse_layers(model):
        w = layer.weight.detach().abs()
        expected_kept.append(w[layer.mask])
        expected_pruned.append(w[~layer.mask])
    expected = torch.cat(expected_pruned).mean() / torch.cat(expected_kept).mean()
    assert pruned_kept_ratio(model) == pytest.approx(float(expected), rel=1e-6)
    assert 0.3 < pruned_kept_ratio(model) < 0.5
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.weight.mul_(layer.mask)
    assert pruned_kept_ratio(model) == 0.0


def _train_mlp(lam: float, steps: int = 8):
    """A two-layer sparse MLP regressing a random dense teacher (fast stand-in for an LM)."""
    from ast_core.optim import ASTAdamW, build_param_groups, masks_for

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(SparseLinear(32, 64), nn.Tanh(), SparseLinear(64, 16))
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.1)
    refresh_masks(model)
    initial = snapshot_masks(model)
    teacher = torch.randn(16, 32, generator=g) * 0.3
    x = torch.randn(256, 32, generator=g)
    y = x @ teacher.T
    opt = ASTAdamW(build_param_groups(model), lr=2e-3, masks=masks_for(model))
    for grp in opt.param_groups:
        grp["sparse_decay"] = lam
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt, initial


def test_decay_during_training_shrinks_pruned_weights_relative_to_kept():
    no_decay, _, _ = _train_mlp(0.0)
    decayed, _, _ = _train_mlp(1.0)
    assert pruned_kept_ratio(decayed) < 0.7 * pruned_kept_ratio(no_decay)


def test_refresh_after_training_keeps_exact_2_4_in_the_optimizer_buffers():
    model, opt, initial = _train_mlp(0.0)
    stats = refresh_masks(model, initial)
    for name, layer in sparse_layers(model):
        assert mask_is_exact(layer.mask, 2, 4), name
        assert opt.masks[layer.weight] is layer.mask
    assert sum(p for p, _ in stats.per_layer.values()) == stats.changed_prev
    assert stats.changed_prev == stats.changed_init > 0  # first refresh after training: prev == initial


@pytest.mark.parametrize("n,m", [(2, 4), (2, 8), (1, 4)])
def test_column_scaled_refresh_equals_the_wanda_mask(n: int, m: int):
    """The refresh with frozen column norms picks exactly nm_mask(wanda_score(W, x²))."""
    from ast_core.masks import wanda_score
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g)
    act_sq = torch.rand(32, generator=g) * 5
    expected = nm_mask(wanda_score(w, act_sq), n, m)
    assert torch.equal(magnitude_nm_mask(w, n, m, act_sq.sqrt()), expected)
    assert not torch.equal(expected, nm_mask(w.abs(), n, m))  # the scale matters on this draw


def test_column_scaled_refresh_differs_from_magnitude_and_checks_its_input():
    model = _model()
    layer = model.up
    # column 2 of every group gets a large activation norm: Wanda keeps it instead of column 1
    scale = {name: torch.ones(l.weight.shape[1]) for name, l in sparse_layers(model)}
    scale["up"] = torch.tensor([1.0, 1.0, 10.0, 1.0]).repeat(layer.weight.shape[1] // 4)
    stats = refresh_masks(model, snapshot_masks(model), scale)
    assert stats.per_layer["down"] == (0, 0)
    assert stats.per_layer["up"][0] == 2 * layer.weight.numel() // 4  # one swap (2 bits) per group
    assert bool(layer.mask[:, 2::4].all()) and not bool(layer.mask[:, 1::4].any())
    with pytest.raises(KeyError, match="down"):
        refresh_masks(model, None, {"up": scale["up"]})
    with pytest.raises(ValueError, match="column scale has shape"):
        magnitude_nm_mask(layer.weight, 2, 4, torch.ones(3))
