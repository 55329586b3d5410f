"""Sparse layers: STE gradient, mask in the state dict, swapping, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ast_core.masks import nm_mask
from ast_core.models import load_model
from ast_core.sparse import (SparseLinear, SparsityError, densify, set_dense_mode, sparse_layers, sparsify)


def test_ste_gradient_equals_the_gradient_of_the_masked_forward() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = SparseLinear.from_module(lin)
    layer.set_mask(nm_mask(layer.weight.abs()))
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    # reference: W ⊙ m as a leaf, plain autograd
    leaf = (layer.weight.detach() * layer.mask).requires_grad_(True)
    torch.nn.functional.linear(x, leaf, layer.bias.detach()).square().sum().backward()
    assert torch.allclose(layer.weight.grad, leaf.grad)
    assert layer.weight.grad[~layer.mask].abs().sum() > 0  # pruned weights get a gradient too (STE)


def test_forward_uses_masked_weight_and_dense_mode_ignores_it() -> None:
    layer = SparseLinear.from_module(nn.Linear(8, 4))
    layer.set_mask(nm_mask(layer.weight.abs()))
    x = torch.randn(3, 8)
    expected = x @ (layer.weight * layer.mask).T + layer.bias
    assert torch.allclose(layer(x), expected)
    layer.dense_mode = True
    assert torch.allclose(layer(x), x @ layer.weight.T + layer.bias)


def test_mask_is_in_the_state_dict() -> None:
    layer = SparseLinear.from_module(nn.Linear(8, 4))
    layer.set_mask(nm_mask(layer.weight.abs()))
    sd = layer.state_dict()
    assert "mask" in sd and sd["mask"].dtype == torch.bool
    other = SparseLinear(8, 4)
    other.load_state_dict(sd)
    assert torch.equal(other.mask, layer.mask)


@pytest.mark.parametrize("arch, expected", [("llama", 14), ("gpt2", 8), ("opt", 12)])
def test_swap_gives_identical_outputs_in_dense_mode(arch: str, expected: int) -> None:
    model = load_model(f"tiny:{arch}", seed=0)
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
        names = sparsify(model)
        set_dense_mode(model, True)
        after = model(ids).logits
    assert len(names) == expected
    assert torch.allclose(before, after, atol=1e-6)
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert isinstance(model.get_output_embeddings(), nn.Linear)


def test_gpt2_conv1d_is_transposed_and_densify_restores_the_layout() -> None:
    model = load_model("tiny:gpt2", seed=0)
    conv_w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # [in, out]
    sparsify(model)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.from_conv1d and torch.equal(layer.weight.detach(), conv_w.t())
    for _, l in sparse_layers(model):
        l.set_mask(nm_mask(l.weight.abs()))
    ids = torch.randint(0, 1000, (1, 10))
    with torch.no_grad():
        sparse_out = model(ids).logits
        densify(model)
        assert model.transformer.h[0].attn.c_attn.weight.shape == conv_w.shape
        assert torch.allclose(model(ids).logits, sparse_out, atol=1e-6)


def test_indivisible_layer_is_refused_by_name_unless_excluded() -> None:
    model = load_model("tiny:llama", seed=0)
    model.model.layers[0].mlp.down_proj = nn.Linear(126, 64, bias=False)
    with pytest.raises(SparsityError, match=r"layers\.0\.mlp\.down_proj \(in_features=126\)"):
        sparsify(model)
    assert not list(sparse_layers(model))  # nothing changed before the refusal
    names = sparsify(model, exclude=[r"layers\.0\.mlp\.down_proj"])
    assert "model.layers.0.mlp.down_proj" not in names and len(names) == 13


def test_model_without_linears_is_refused() -> None:
    model = nn.Sequential(nn.ModuleList([nn.ReLU(), nn.ReLU()]))
    with pytest.raises(SparsityError, match="no linear layers"):
        sparsify(model)
