"""ASTAdamW numerics (docs/ARCHITECTURE.md, "The method") and the λ(t) / learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ast_core.masks import nm_mask
from ast_core.optim import (ASTAdamW, ASTSchedule, build_param_groups, cosine_lr, decay_lambda, masks_for)
from ast_core.sparse import SparseLinear, sparse_layers

BETAS = (0.9, 0.95)
EPS = 1e-8


def _params(seed: int = 0, dtype=torch.float64) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, torch.Tensor]:
    """A masked matrix, an unmasked matrix and a bias, plus the 2:4 mask of the first."""
    g = torch.Generator().manual_seed(seed)
    w_masked = nn.Parameter(torch.randn(8, 16, generator=g, dtype=dtype))
    w_plain = nn.Parameter(torch.randn(6, 8, generator=g, dtype=dtype))
    bias = nn.Parameter(torch.randn(6, generator=g, dtype=dtype))
    return w_masked, w_plain, bias, nm_mask(w_masked.detach().abs())


def _clone(ps):
    return [nn.Parameter(p.detach().clone()) for p in ps]


def _groups(w_masked, w_plain, bias, wd=0.1):
    return [dict(params=[w_masked, w_plain], weight_decay=wd), dict(params=[bias], weight_decay=0.0)]


def _grads(step: int, shapes, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g, dtype=dtype) * 0.1 for s in shapes]


def _reference_step(p, grad, st, mask, lr, wd, lam, mode, int_mask_bug=False):
    """The update rule of docs/ARCHITECTURE.md written out directly (float64, no in-place tricks).

    ``int_mask_bug`` reproduces the official code's decay term ``W * ~mask * λ``
    with an int 0/1 mask, where ``~`` is bitwise not: masked → −1, kept → −2.
    """
    b1, b2 = BETAS
    st["t"] += 1
    t = st["t"]
    w = p * (1 - lr * wd)
    st["m"] = b1 * st["m"] + (1 - b1) * grad
    if int_mask_bug:
        d = w * (~mask) * lam  # mask is int64 here: ~0 = -1, ~1 = -2
    else:
        d = lam * (1 - mask.to(w.dtype)) * w
    u = st["m"] + d
    s = grad + d if mode == "gradient" else u
    st["v"] = b2 * st["v"] + (1 - b2) * s * s
    denom = torch.sqrt(st["v"]) / math.sqrt(1 - b2 ** t) + EPS
    return w - lr / (1 - b1 ** t) * u / denom


def test_lambda_zero_equals_torch_adamw_over_steps_with_weight_decay_and_a_masked_param():
    ours_ps, ref_ps = list(_params()), None
    mask = ours_ps.pop()
    ref_ps = _clone(ours_ps)
    ours = ASTAdamW(_groups(*ours_ps), lr=3e-3, betas=BETAS, eps=EPS, masks={ours_ps[0]: mask})
    ref = torch.optim.AdamW(_groups(*ref_ps), lr=3e-3, betas=BETAS, eps=EPS, foreach=False)
    for step in range(7):
        lr = 3e-3 * (1 + step) / 7  # a changing lr, as under the schedule
        for opt in (ours, ref):
            for grp in opt.param_groups:
                grp["lr"] = lr
        for p, q, g in zip(ours_ps, ref_ps, _grads(step, [p.shape for p in ours_ps])):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    start = _params()
    for i, (p, q) in enumerate(zip(ours_ps, ref_ps)):
        assert torch.allclose(p, q, rtol=1e-13, atol=1e-15)
        assert not torch.allclose(p, start[i])  # it did move


@pytest.mark.parametrize("mode", ["gradient", "update"])
def test_masked_update_matches_design_equations_over_steps(mode):
    w_masked, w_plain, bias, mask = _params(seed=3)
    ref = [w.detach().clone() for w in (w_masked, w_plain, bias)]
    states = [dict(t=0, m=torch.zeros_like(r), v=torch.zeros_like(r)) for r in ref]
    opt = ASTAdamW(_groups(w_masked, w_plain, bias), lr=2e-2, betas=BETAS, eps=EPS,
                   masks={w_masked: mask}, second_moment=mode)
    for step in range(6):
        lam = 0.5 * min(1.0, step / 3)  # annealed λ, large enough to matter
        for grp in opt.param_groups:
            grp["sparse_decay"] = lam
        grads = _grads(step, [r.shape for r in ref])
        for p, g in zip((w_masked, w_plain, bias), grads):
            p.grad = g.clone()
        opt.step()
        masks = [mask, None, None]
        wds = [0.1, 0.1, 0.0]
        for i in range(3):
            ref[i] = _reference_step(ref[i], grads[i], states[i], masks[i] if masks[i] is not None
                                     else torch.ones_like(ref[i], dtype=torch.bool),
                                     2e-2, wds[i], lam if masks[i] is not None else 0.0,
                                     mode if masks[i] is not None else "gradient")
    for p, r in zip((w_masked, w_plain, bias), ref):
        assert torch.allclose(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_decay_shrinks_only_masked_weights_under_zero_gradient():
    g = torch.Generator().manual_seed(7)
    w0 = (torch.rand(8, 16, generator=g, dtype=torch.float64) + 0.5) * torch.randn(8, 16, generator=g,
                                                                                     dtype=torch.float64).sign()
    mask = nm_mask(w0.abs())
    w = nn.Parameter(w0.clone())
    lr, wd, lam, steps = 1e-3, 0.1, 1e-2, 8
    opt = ASTAdamW([w], lr=lr, betas=BETAS, eps=EPS, weight_decay=wd, masks={w: mask})
    for grp in opt.param_groups:
        grp["sparse_decay"] = lam
    # Expected masked trajectory: d = λW', v_t = β2 v + (1−β2) d², W ← W' − lr/bc1 · d/(√v/√bc2 + eps)
    exp_masked, v = w0.clone(), torch.zeros_like(w0)
    for t in range(1, steps + 1):
        w.grad = torch.zeros_like(w0)
        opt.step()
        wd_w = exp_masked * (1 - lr * wd)
        d = lam * wd_w
        v = BETAS[1] * v + (1 - BETAS[1]) * d * d
        exp_masked = wd_w - lr / (1 - BETAS[0] ** t) * d / (v.sqrt() / math.sqrt(1 - BETAS[1] ** t) + EPS)
    kept_expected = w0 * (1 - lr * wd) ** steps  # kept weights: only decoupled weight decay
    assert torch.allclose(w.detach()[mask], kept_expected[mask], rtol=1e-14, atol=0)
    assert torch.allclose(w.detach()[~mask], exp_masked[~mask], rtol=1e-12, atol=1e-15)
    shrink_masked = w0[~mask].abs() - w.detach()[~mask].abs()
    shrink_kept = w0[mask].abs() - w.detach()[mask].abs()
    assert (shrink_masked > 0).all() and (w.detach()[~mask].sign() == w0[~mask].sign()).all()
    assert shrink_masked.min() > 10 * shrink_kept.max()  # the decay, not weight decay, does the work


def test_official_int_mask_bug_grows_masked_weights_where_ours_shrinks_them():
    g = torch.Generator().manual_seed(11)
    w0 = torch.randn(8, 16, generator=g, dtype=torch.float64)
    mask = nm_mask(w0.abs())
    lr, lam = 1e-3, 1e-2
    w = nn.Parameter(w0.clone())
    opt = ASTAdamW([w], lr=lr, betas=BETAS, eps=EPS, weight_decay=0.0, masks={w: mask})
    opt.param_groups[0]["sparse_decay"] = lam
    buggy, st = w0.clone(), dict(t=0, m=torch.zeros_like(w0), v=torch.zeros_like(w0))
    for step in range(5):
        grad = _grads(step, [w0.shape])[0] * 1e-3  # small loss gradient: the decay dominates
        w.grad = grad.clone()
        opt.step()
        buggy = _reference_step(buggy, grad, st, mask.long(), lr, 0.0, lam, "update", int_mask_bug=True)
    ours_masked = w.detach()[~mask].abs().mean()
    buggy_masked = buggy[~mask].abs().mean()
    start = w0[~mask].abs().mean()
    assert ours_masked < start < buggy_masked
    # the bug also "decays" kept weights, by −2λ: they grow too
    assert buggy[mask].abs().mean() > w0[mask].abs().mean()


def test_int_mask_is_refused():
    w = nn.Parameter(torch.randn(4, 8))
    with pytest.raises(TypeError, match="torch.bool"):
        ASTAdamW([w], masks={w: nm_mask(w.detach().abs()).long()})


def test_mask_changed_in_place_redirects_the_decay():
    layer = SparseLinear(16, 4, bias=False).double()
    nn.init.normal_(layer.weight)  # SparseLinear allocates with torch.empty
    layer.set_mask(nm_mask(layer.weight.detach().abs()))
    masks = masks_for(layer)
    assert masks[layer.weight] is layer.mask
    opt = ASTAdamW([layer.weight], lr=1e-3, weight_decay=0.0, masks=masks)
    opt.param_groups[0]["sparse_decay"] = 1.0
    new_mask = ~layer.mask  # 2:4 complement
    layer.mask.copy_(new_mask)
    before = layer.weight.detach().clone()
    layer.weight.grad = torch.zeros_like(before)
    opt.step()
    moved = (layer.weight.detach() != before)
    assert torch.equal(moved, ~new_mask)


def _flatten_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def test_state_round_trip_through_safetensors_continues_identically():
    from safetensors.torch import load, save

    def make(ps):
        w_masked, w_plain, bias, mask = ps
        opt = ASTAdamW(_groups(w_masked, w_plain, bias), lr=1e-2, masks={w_masked: mask})
        for grp in opt.param_groups:
            grp["sparse_decay"] = 0.3
        return [w_masked, w_plain, bias], opt

    ps_a, opt_a = make(_params(seed=5))
    for step in range(3):
        for p, g in zip(ps_a, _grads(step, [p.shape for p in ps_a])):
            p.grad = g
        opt_a.step()
    blob = save(_flatten_state(opt_a))
    groups_meta = opt_a.state_dict()["param_groups"]
    assert all(isinstance(v, torch.Tensor) for v in _flatten_state(opt_a).values())

    ps_b = _clone(ps_a)
    _, _, _, mask = _params(seed=5)
    ps_b_full, opt_b = make((*ps_b, mask))
    tensors = load(blob)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    opt_b.load_state_dict({"state": state, "param_groups": groups_meta})
    for step in range(3, 6):
        grads = _grads(step, [p.shape for p in ps_a])
        for p, q, g in zip(ps_a, ps_b_full, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for p, q in zip(ps_a, ps_b_full):
        assert torch.equal(p, q)
    assert float(opt_b.state[ps_b_full[0]]["step"]) == 6.0


def test_torch_adamw_state_loads_into_ast_adamw():
    ps = list(_params(seed=2))[:3]
    ref = torch.optim.AdamW(_groups(*ps), lr=1e-2, foreach=False)
    for p, g in zip(ps, _grads(0, [p.shape for p in ps])):
        p.grad = g
    ref.step()
    ours = ASTAdamW(_groups(*ps), lr=1e-2)
    ours.load_state_dict(ref.state_dict())
    assert float(ours.state[ps[0]]["step"]) == 1.0


def test_param_groups_decay_matrices_only():
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    groups = build_param_groups(model, weight_decay=0.1)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_wd[0.1] == {id(model[0].weight), id(model[2].weight)}
    assert by_wd[0.0] == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}


def test_masks_for_maps_each_sparse_weight_to_its_own_buffer():
    model = nn.Sequential(SparseLinear(8, 4), nn.ReLU(), SparseLinear(4, 8))
    masks = masks_for(model)
    assert len(masks) == 2
    for _, layer in sparse_layers(model):
        assert masks[layer.weight] is layer.mask


def test_decay_lambda_ramps_linearly_then_holds():
    lam_max, t0 = 6e-5, 100
    assert decay_lambda(0, lam_max, t0) == 0.0
    assert decay_lambda(50, lam_max, t0) == pytest.approx(3e-5, rel=1e-12)
    assert decay_lambda(100, lam_max, t0) == pytest.approx(lam_max, rel=1e-12)
    assert decay_lambda(400, lam_max, t0) == pytest.approx(lam_max, rel=1e-12)
    assert decay_lambda(0, lam_max, 0) == lam_max  # T0 = 0: full decay from the start


def test_cosine_lr_warmup_peak_and_floor():
    peak, floor, warm, total = 2e-4, 2e-5, 10, 110
    assert cosine_lr(0, total, peak, floor, warm) == pytest.approx(peak / warm)
    assert cosine_lr(4, total, peak, floor, warm) == pytest.approx(peak * 5 / warm)
    assert cosine_lr(9, total, peak, floor, warm) == pytest.approx(peak)
    assert cosine_lr(10, total, peak, floor, warm) == pytest.approx(peak)
    assert cosine_lr(60, total, peak, floor, warm) == pytest.approx((peak + floor) / 2)
    assert cosine_lr(total, total, peak, floor, warm) == pytest.approx(floor, abs=1e-18)
    after = [cosine_lr(s, total, peak, floor, warm) for s in range(warm, total + 50)]
    assert min(after) >= floor
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert cosine_lr(total + 49, total, peak, floor, warm) == floor


def test_schedule_applies_lr_and_lambda_to_every_group_and_rejects_bad_fields():
    sched = ASTSchedule(lambda_max=1e-4, t0=20, peak_lr=2e-4, min_lr=2e-5, warmup_steps=5, total_steps=80)
    w, b = nn.Parameter(torch.zeros(2, 4)), nn.Parameter(torch.zeros(2))
    opt = ASTAdamW([dict(params=[w]), dict(params=[b], weight_decay=0.0)])
    lr, lam = sched.apply(opt, 10)
    assert lam == pytest.approx(5e-5) and lr == sched.lr(10)
    assert all(g["lr"] == lr and g["sparse_decay"] == lam for g in opt.param_groups)
    with pytest.raises(ValueError, match="min_lr"):
        ASTSchedule(lambda_max=1e-4, t0=20, peak_lr=2e-4, min_lr=3e-4, warmup_steps=5, total_steps=80)
