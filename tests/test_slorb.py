"""SLoRB: mean and least-squares init, parameter overhead, the group-sum shortcut, gradients, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ast_core.masks import magnitude_score, nm_mask
from ast_core.models import load_model
from ast_core.slorb import (SLoRB, SLoRBError, add_slorb, fold_is_exact, folded_weight, group_sum_matrix,
                            load_slorb_state, remove_slorb, slorb_parameter_count, slorb_state)
from ast_core.sparse import SparseLinear, sparse_layers
from support import tiny


def _pruned_layer(out_f: int = 12, in_f: int = 32, dtype: torch.dtype = torch.float64) -> SparseLinear:
    dense = nn.Linear(in_f, out_f, dtype=dtype)
    layer = SparseLinear.from_module(dense)
    layer.set_mask(nm_mask(magnitude_score(layer.weight)))
    return layer


def _dense_out(layer: SparseLinear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.detach().T + layer.bias.detach()


def _sparse_tiny(spec: str = "tiny:llama", seed: int = 0) -> nn.Module:
    return tiny.magnitude_sparse(load_model(spec, seed=seed))


def test_mean_init_reproduces_dense_output_for_group_constant_inputs() -> None:
    k = 8
    layer = _pruned_layer()
    layer.side = SLoRB.from_layer(layer, k)
    x = torch.randn(5, 32 // k, dtype=torch.float64).repeat_interleave(k, dim=1)  # constant per group
    with torch.no_grad():
        assert torch.allclose(layer(x), _dense_out(layer, x), atol=1e-12)
        # The branch is what closes the gap: without it the sparse output differs.
        side, layer.side = layer.side, None
        assert not torch.allclose(layer(x), _dense_out(layer, x), atol=1e-6)
        layer.side = side


def test_mean_init_does_not_reproduce_dense_output_for_general_inputs() -> None:
    layer = _pruned_layer()
    layer.side = SLoRB.from_layer(layer, 8)
    x = torch.randn(5, 32, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(layer(x), _dense_out(layer, x), atol=1e-6)


def test_init_is_mean_of_pruned_weights_per_group() -> None:
    k = 4
    layer = _pruned_layer(out_f=3, in_f=8)
    side = SLoRB.from_layer(layer, k)
    w, m = layer.weight.detach(), layer.mask
    expected = torch.stack([(w[:, g * k:(g + 1) * k] * (~m[:, g * k:(g + 1) * k])).sum(1) / k
                            for g in range(8 // k)], dim=1)
    assert side.S.shape == (3, 2)
    assert torch.allclose(side.S.detach(), expected)


def test_all_ones_mask_gives_zero_branch() -> None:
    layer = SparseLinear.from_module(nn.Linear(32, 6))
    assert torch.count_nonzero(SLoRB.from_layer(layer, 16).S) == 0


def test_parameter_overhead_is_one_over_k_of_layer_weights() -> None:
    for k in (4, 8, 16):
        layer = _pruned_layer(out_f=12, in_f=32)
        side = SLoRB.from_layer(layer, k)
        assert sum(p.numel() for p in side.parameters()) * k == layer.weight.numel()


def test_add_slorb_on_tiny_llama_returns_sum_out_in_over_k() -> None:
    model = _sparse_tiny()
    k = 16
    expected = sum(layer.out_features * layer.in_features // k for _, layer in sparse_layers(model))
    assert add_slorb(model, group_size=k) == expected
    assert slorb_parameter_count(model) == expected
    assert all(isinstance(layer.side, SLoRB) for _, layer in sparse_layers(model))
    names = remove_slorb(model)
    assert len(names) == len(list(sparse_layers(model)))
    assert slorb_parameter_count(model) == 0
    assert all(layer.side is None for _, layer in sparse_layers(model))


def test_add_slorb_with_trainable_projection_counts_projection_parameters() -> None:
    model = _sparse_tiny()
    k = 16
    expected = sum(layer.out_features * layer.in_features // k + layer.in_features ** 2 // k
                   for _, layer in sparse_layers(model))
    assert add_slorb(model, group_size=k, trainable_projection=True) == expected


def test_add_slorb_twice_is_refused() -> None:
    model = _sparse_tiny()
    add_slorb(model, 16)
    with pytest.raises(SLoRBError, match="already have a side branch"):
        add_slorb(model, 16)


def test_group_sum_path_equals_explicit_projection_matmul() -> None:
    k = 8
    layer = _pruned_layer()
    side = SLoRB.from_layer(layer, k)
    side.S.data.normal_()
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    X = group_sum_matrix(32, k, dtype=torch.float64)
    assert X.shape == (4, 32) and torch.equal(X.sum(0), torch.ones(32, dtype=torch.float64))
    assert X[1, 8:16].eq(1).all() and X[1, :8].eq(0).all()
    with torch.no_grad():
        assert torch.allclose(side(x), (x @ X.T) @ side.S.T)
        trainable = SLoRB.from_layer(layer, k, trainable_projection=True)
        trainable.S.data.copy_(side.S.data)
        assert torch.equal(trainable.X.data, X)
        assert torch.allclose(trainable(x), side(x))
    assert torch.equal(side.expanded(), side.S.detach() @ X)


def test_default_trains_s_only_and_weight_keeps_ste_gradient() -> None:
    layer = _pruned_layer()
    layer.side = SLoRB.from_layer(layer, 8)
    x = torch.randn(4, 32, dtype=torch.float64)
    layer(x).sum().backward()
    assert [n for n, p in layer.side.named_parameters()] == ["S"]
    assert layer.side.S.grad is not None and layer.side.S.grad.abs().sum() > 0
    # STE: d(sum y)/dW = 1ᵀx for every row, pruned entries included.
    assert torch.allclose(layer.weight.grad, x.sum(0).expand_as(layer.weight))
    # d(sum y)/dS = group sums of x, summed over the batch, for every row.
    assert torch.allclose(layer.side.S.grad, layer.side.group_sums(x).sum(0).expand_as(layer.side.S))


def test_trainable_projection_gets_gradients_for_x_and_s() -> None:
    layer = _pruned_layer()
    layer.side = SLoRB.from_layer(layer, 8, trainable_projection=True)
    layer.side.S.data.normal_()
    x = torch.randn(4, 32, dtype=torch.float64)
    layer(x).sum().backward()
    assert sorted(n for n, _ in layer.side.named_parameters()) == ["S", "X"]
    for p in (layer.side.S, layer.side.X, layer.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # d(sum y)/dX = (1ᵀS)ᵀ ⊗ (1ᵀx).
    expected = layer.side.S.detach().sum(0).unsqueeze(1) * x.sum(0).unsqueeze(0)
    assert torch.allclose(layer.side.X.grad, expected)


def test_dense_mode_disables_side_branch() -> None:
    layer = _pruned_layer()
    layer.side = SLoRB.from_layer(layer, 8)
    x = torch.randn(4, 32, dtype=torch.float64)
    with torch.no_grad():
        layer.dense_mode = True
        assert torch.allclose(layer(x), _dense_out(layer, x))
        layer.dense_mode = False
        assert not torch.allclose(layer(x), _dense_out(layer, x), atol=1e-6)


def test_group_size_not_dividing_in_features_names_the_layer() -> None:
    model = _sparse_tiny()
    with pytest.raises(SLoRBError, match=r"model\.layers\.0\.self_attn\.q_proj \(in_features=64\)"):
        add_slorb(model, group_size=48)
    assert slorb_parameter_count(model) == 0  # nothing attached
    with pytest.raises(SLoRBError, match="mlp.down_proj.*does not divide in_features=128"):
        SLoRB.from_layer(model.get_submodule("model.layers.1.mlp.down_proj"), 48,
                         name="model.layers.1.mlp.down_proj")


def test_state_dict_round_trip_on_fresh_model_restores_outputs() -> None:
    ids = torch.randint(0, 1000, (2, 9))
    src = _sparse_tiny(seed=0)
    add_slorb(src, 16)
    for _, layer in sparse_layers(src):
        layer.side.S.data.normal_(std=0.05)  # as if trained
    with torch.no_grad():
        want = src(ids).logits
    state = src.state_dict()
    assert "model.layers.0.mlp.up_proj.side.S" in state

    fresh = _sparse_tiny(seed=1)
    with pytest.raises(RuntimeError, match="side.S"):  # not attached: unexpected keys
        fresh.load_state_dict(state)
    add_slorb(fresh, 16)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)

    wrong_k = _sparse_tiny(seed=1)
    add_slorb(wrong_k, 8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        wrong_k.load_state_dict(state)


def test_slorb_state_round_trip_and_strict_loading() -> None:
    src = _sparse_tiny(seed=0)
    add_slorb(src, 16)
    for _, layer in sparse_layers(src):
        layer.side.S.data.normal_()
    state = slorb_state(src)
    assert set(state) == {k for k in src.state_dict() if ".side." in k}

    dst = _sparse_tiny(seed=0)
    with pytest.raises(SLoRBError, match="add_slorb"):
        load_slorb_state(dst, state)
    add_slorb(dst, 16)
    load_slorb_state(dst, state)
    for key, value in slorb_state(dst).items():
        assert torch.equal(value, state[key])

    other_k = _sparse_tiny(seed=0)
    add_slorb(other_k, 8)
    with pytest.raises(SLoRBError, match="shape mismatches"):
        load_slorb_state(other_k, state)
    partial = dict(state)
    partial.pop(next(iter(partial)))
    with pytest.raises(SLoRBError, match="missing"):
        load_slorb_state(dst, partial)


def test_fold_is_exact_only_when_branch_keeps_pattern() -> None:
    layer = _pruned_layer()
    assert fold_is_exact(layer)  # no branch
    layer.side = SLoRB.from_layer(layer, 8)
    assert not fold_is_exact(layer)  # mean init fills the pruned slots: dense
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ folded_weight(layer).T + layer.bias)
        layer.side.S.zero_()
    assert fold_is_exact(layer)


# --------------------------------------------------------------------------- least-squares init

def _outlier_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with one large-scale channel in every group of 4, as LLM activations have outlier channels."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d, dtype=torch.float64)
    scale[::4] = 10.0
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 0.3


def _wanda_layer(x: torch.Tensor, out_f: int = 12) -> SparseLinear:
    """A 2:4 layer whose mask keeps what Wanda keeps for inputs ``x`` (the outlier columns)."""
    from ast_core.masks import wanda_score
    torch.manual_seed(0)
    layer = SparseLinear.from_module(nn.Linear(x.shape[1], out_f, dtype=x.dtype))
    layer.set_mask(nm_mask(wanda_score(layer.weight.detach(), x.pow(2).mean(0))))
    return layer


def _cross(x: torch.Tensor, k: int) -> torch.Tensor:
    """E[x zᵀ] with z the group sums of x, computed the explicit way (through the 0/1 projection)."""
    z = x @ group_sum_matrix(x.shape[1], k, dtype=x.dtype).T
    return x.T @ z / x.shape[0]


def _pruning_error(layer: SparseLinear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x) - _dense_out(layer, x)).pow(2).mean())


def test_lstsq_init_is_the_ridge_least_squares_solution_on_the_calibration_inputs() -> None:
    from ast_core.slorb import LSTSQ_DAMP
    k = 4
    x = _outlier_inputs(500, 16)
    layer = _wanda_layer(x, out_f=6)
    side = SLoRB.from_layer(layer, k, cross=_cross(x, k))
    # Reference: the normal equations of min_S mean‖R x − S z‖² + δ‖S‖², solved on the stacked data.
    r = layer.weight.detach() * (~layer.mask)
    z = x @ group_sum_matrix(16, k, dtype=x.dtype).T
    zz = z.T @ z / len(x)
    ridge = LSTSQ_DAMP * zz.diagonal().mean()
    ref = torch.linalg.solve(zz + ridge * torch.eye(zz.shape[0], dtype=x.dtype), (x @ r.T).T @ z / len(x), left=False)
    torch.testing.assert_close(side.S.detach(), ref.to(side.S.dtype), rtol=1e-4, atol=1e-6)


def test_lstsq_init_lowers_the_pruning_error_where_the_mean_init_raises_it() -> None:
    k = 8
    x = _outlier_inputs(800, 32, seed=1)
    new = _outlier_inputs(800, 32, seed=2)  # held out: same distribution, other draws
    layer = _wanda_layer(x)
    bare, bare_new = _pruning_error(layer, x), _pruning_error(layer, new)
    layer.side = SLoRB.from_layer(layer, k)
    mean = _pruning_error(layer, x)
    layer.side = SLoRB.from_layer(layer, k, cross=_cross(x, k))
    fitted = _pruning_error(layer, x)
    # The mean init spreads S over every column of a group, the kept outlier columns included ...
    assert mean > bare
    # ... the fitted one only removes error, and does so on new inputs from the same distribution too
    assert fitted < bare
    assert _pruning_error(layer, new) < bare_new


def test_collect_group_cross_matches_the_explicit_statistic_and_add_slorb_uses_it() -> None:
    from ast_core.calibration import collect_group_cross
    model = _sparse_tiny()
    name = "model.layers.1.mlp.down_proj"
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 5000, (2, 12), generator=g) for _ in range(3)]
    cross = collect_group_cross(model, batches, 16)
    handle.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()
    assert set(cross) == {n for n, _ in sparse_layers(model)}
    assert cross[name].dtype == torch.float32 and cross[name].shape == (128, 8)
    torch.testing.assert_close(cross[name].double(), _cross(x, 16), rtol=1e-5, atol=1e-7)
    add_slorb(model, 16, cross=cross)
    layer = model.get_submodule(name)
    expected = SLoRB.from_layer(layer, 16, cross=cross[name]).S
    torch.testing.assert_close(layer.side.S, expected, rtol=0, atol=0)
    assert not torch.allclose(layer.side.S, SLoRB.from_layer(layer, 16).S)  # not the mean init


def test_lstsq_init_refuses_missing_or_misshapen_statistics() -> None:
    model = _sparse_tiny()
    names = [n for n, _ in sparse_layers(model)]
    with pytest.raises(SLoRBError, match="no calibration statistic for: " + names[0]):
        add_slorb(model, 16, cross={})
    assert not any(layer.side is not None for _, layer in sparse_layers(model))  # nothing attached
    layer = model.get_submodule(names[0])
    with pytest.raises(SLoRBError, match=r"shape \(64, 4\), expected \(64, 8\)"):
        SLoRB.from_layer(layer, 8, cross=torch.zeros(64, 4), name=names[0])
