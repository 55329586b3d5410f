"""The AST loop: resumes bitwise, stops cleanly on NaN, refreshes masks, uses the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ast_core.checkpoint import latest_checkpoint
from ast_core.masks import mask_is_exact, nm_mask
from ast_core.sparse import sparse_layers
from ast_core.teacher_cache import build_cache, fingerprint
from ast_core.train import BlockOrder, CachedTeacher, OnlineTeacher, TrainingDiverged, train
from support import tiny
from tasks.config import TrainConfig


def _cfg(**kw) -> TrainConfig:
    # magnitude refresh: the loop tests build students without calibration statistics (the Wanda refresh,
    # the default, has its own test below)
    base = dict(method="ast-boosted", steps=6, batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                lambda_max=1e-2, t0_steps=2, refresh_every=2, checkpoint_every=2, slorb_group=16,
                refresh_score="magnitude")
    base.update(kw)
    return TrainConfig(**base)


def _student(boosted: bool = True) -> torch.nn.Module:
    """The tiny seed-0 student; ``blocks`` and ``teacher`` (seed 0) are the fixtures of tests/conftest.py."""
    return tiny.student(slorb=boosted)


def _final_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_interruption_is_bitwise_identical(tmp_path: Path, blocks, teacher) -> None:
    cfg = _cfg()
    full = _student()
    train(full, blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "a", progress=False)

    part = _student()
    # stop after 3 steps: the last checkpoint is step 2, step 3's work is lost as in a crash
    train(part, blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "b",
          progress=False, stop_after=3)
    assert latest_checkpoint(tmp_path / "b").name == "step_000002"
    resumed = _student()
    res = train(resumed, blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "b",
                resume=True, progress=False)
    assert res.resumed_from == 2 and res.steps == 6
    a, b = _final_state(full), _final_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_names_the_last_checkpoint(tmp_path: Path, blocks, teacher) -> None:
    model = _student(boosted=False)
    cfg = _cfg(method="ast-naive", steps=6)
    calls = {"n": 0}
    real = OnlineTeacher(teacher)

    class PoisonedTeacher:
        def kl(self, *a):
            calls["n"] += 1
            out = real.kl(*a)
            return out * float("nan") if calls["n"] == 4 else out

    with pytest.raises(TrainingDiverged, match=r"step 4.*step_000002"):
        train(model, blocks, cfg, seed=0, teacher=PoisonedTeacher(), checkpoint_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path).name == "step_000002"


def test_masks_stay_exact_and_adapt_under_ast(tmp_path: Path, blocks, teacher) -> None:
    model = _student(boosted=False)
    before = {n: l.mask.clone() for n, l in sparse_layers(model)}
    res = train(model, blocks, _cfg(method="ast-naive", steps=6, lr=3e-2), seed=0,
                teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path, progress=False)
    assert all(mask_is_exact(l.mask) for _, l in sparse_layers(model))
    changed = sum(int((before[n] != l.mask).sum()) for n, l in sparse_layers(model))
    assert changed > 0 and res.last_flip is not None and res.last_flip.changed_init == changed
    assert any("flip_rate_prev" in h for h in res.history)


def test_naive_method_keeps_the_mask_fixed(tmp_path: Path, blocks) -> None:
    model = _student(boosted=False)
    before = {n: l.mask.clone() for n, l in sparse_layers(model)}
    train(model, blocks, _cfg(method="naive", lr=3e-2), seed=0, teacher=None, checkpoint_dir=tmp_path,
          progress=False)
    assert all(torch.equal(before[n], l.mask) for n, l in sparse_layers(model))


def test_fixed_kd_distils_like_ast_but_keeps_mask_and_pruned_weights_undecayed(tmp_path: Path, blocks,
                                                                               teacher) -> None:
    """fixed-kd: the same KD loss as ast-naive at step 1, the initial mask kept to the end, λ(t) = 0,
    while ast-naive from the same start refreshes its masks."""
    cfg_fixed = _cfg(method="fixed-kd", lr=3e-2, refresh_every=1)
    fixed, ast = _student(boosted=False), _student(boosted=False)
    before = {n: l.mask.clone() for n, l in sparse_layers(fixed)}
    rf = train(fixed, blocks, cfg_fixed, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "f",
               progress=False)
    ra = train(ast, blocks, _cfg(method="ast-naive", lr=3e-2, refresh_every=1), seed=0,
               teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "a", progress=False)
    assert all(torch.equal(before[n], l.mask) for n, l in sparse_layers(fixed))
    assert rf.last_flip is None and not any("flip_rate_prev" in h for h in rf.history)
    assert all(h["lam"] == 0.0 for h in rf.history if "lam" in h) and any(h["kl"] > 0 for h in rf.history)
    assert rf.history[0]["loss"] == ra.history[0]["loss"] and rf.history[0]["kl"] == ra.history[0]["kl"]
    assert ra.last_flip is not None and ra.last_flip.changed_init > 0


def test_fixed_kd_slorb_trains_its_side_branch_on_a_mask_that_never_moves(tmp_path: Path, blocks, teacher) -> None:
    """fixed-kd-slorb: ast-boosted's first step (same loss), then the initial mask to the end, no decay, and the
    SLoRB S trained; ast-boosted from the same start refreshes its masks."""
    runs, before, side0 = {}, {}, {}
    for method in ("fixed-kd-slorb", "ast-boosted"):
        model = _student(boosted=True)
        before[method] = {n: l.mask.clone() for n, l in sparse_layers(model)}
        side0[method] = {n: p.detach().clone() for n, p in model.named_parameters() if ".side." in n}
        runs[method] = (model, train(model, blocks, _cfg(method=method, lr=3e-2, refresh_every=1), seed=0,
                                     teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / method, progress=False))
    (fixed, rf), (_, ra) = runs["fixed-kd-slorb"], runs["ast-boosted"]
    assert side0["fixed-kd-slorb"] and all(torch.equal(side0["fixed-kd-slorb"][n], side0["ast-boosted"][n])
                                           for n in side0["ast-boosted"])
    assert all(torch.equal(before["fixed-kd-slorb"][n], l.mask) for n, l in sparse_layers(fixed))
    assert all(h["lam"] == 0.0 for h in rf.history if "lam" in h) and rf.last_flip is None
    assert any(not torch.equal(side0["fixed-kd-slorb"][n], p) for n, p in fixed.named_parameters() if ".side." in n)
    assert rf.history[0]["loss"] == ra.history[0]["loss"]
    assert ra.last_flip is not None and ra.last_flip.changed_init > 0


def test_fixed_kd_with_the_update_form_is_its_own_optimizer_and_keeps_the_mask(tmp_path: Path, blocks,
                                                                               teacher) -> None:
    """second_moment: update on a fixed mask: v tracks m̃² on the sparse weights (the control of an adaptive
    run with that form), so the weights differ from the gradient form; the mask stays the initial one."""
    runs = {}
    for form in ("gradient", "update"):
        model = _student(boosted=False)
        before = {n: l.mask.clone() for n, l in sparse_layers(model)}
        train(model, blocks, _cfg(method="fixed-kd", second_moment=form), seed=0, teacher=OnlineTeacher(teacher),
              checkpoint_dir=tmp_path / form, progress=False)
        assert all(torch.equal(before[n], l.mask) for n, l in sparse_layers(model))
        runs[form] = {n: l.weight.detach().clone() for n, l in sparse_layers(model)}
    assert any(not torch.equal(runs["gradient"][n], runs["update"][n]) for n in runs["gradient"])


def test_training_from_a_topk_cache_with_full_vocab_equals_online_kd(tmp_path: Path, blocks, teacher) -> None:
    """With k = vocab the cache target is the full distribution: same losses as online KD."""
    vocab = teacher.config.vocab_size
    fp = fingerprint(teacher="t", tokenizer="x", data="d", seq_len=16, fmt="topk", k=vocab, samples=0,
                     temperature=2.0, seed=0)
    cache = build_cache(tmp_path / "cache", teacher, blocks[:4], fp, batch_size=2, progress=False)
    cfg = _cfg(method="ast-naive", steps=2, batch_size=2)
    small = blocks[:4]
    a, b = _student(False), _student(False)
    ra = train(a, small, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "a", progress=False)
    rb = train(b, small, cfg, seed=0, teacher=CachedTeacher(cache), checkpoint_dir=tmp_path / "b", progress=False)
    for ha, hb in zip(ra.history, rb.history):
        assert ha["kl"] == pytest.approx(hb["kl"], rel=2e-3, abs=1e-4)


def test_block_order_is_a_permutation_per_epoch_and_pure_in_step() -> None:
    order = BlockOrder(10, seed=1)
    first = order.ids(0, 10)
    assert sorted(first.tolist()) == list(range(10))
    assert np.array_equal(BlockOrder(10, seed=1).ids(7, 6), np.concatenate([first[7:], order.ids(10, 3)]))


def test_validation_curve_is_recorded_and_does_not_change_training(tmp_path: Path, blocks, teacher) -> None:
    from ast_core.train import causal_ce, validation_loss
    val = tiny.blocks(n=3, seed=1)
    plain = _student(boosted=False)
    train(plain, blocks, _cfg(method="ast-naive"), seed=0, teacher=OnlineTeacher(teacher),
          checkpoint_dir=tmp_path / "a", progress=False)
    watched = _student(boosted=False)
    res = train(watched, blocks, _cfg(method="ast-naive", eval_every=4), seed=0, teacher=OnlineTeacher(teacher),
                checkpoint_dir=tmp_path / "b", progress=False, val_blocks=val)
    a, b = _final_state(plain), _final_state(watched)
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation draws no randomness and takes no step
    points = [(h["step"], h["tokens"], h["val_ppl"]) for h in res.history if "val_ppl" in h]
    assert [p[0] for p in points] == [0, 4, 6] and points[0][1] == 0 and points[-1][1] == 6 * 2 * 16
    # the last point equals the mean next-token CE of the trained model, computed by hand
    ids = torch.from_numpy(val.astype(np.int64))
    with torch.no_grad():
        by_hand = float(causal_ce(watched(ids).logits, ids))
    assert validation_loss(watched, val, batch_size=2) == pytest.approx(by_hand, rel=1e-5)
    assert points[-1][2] == pytest.approx(float(np.exp(by_hand)), rel=1e-5)


def _wanda_scale(model: torch.nn.Module, blocks: np.ndarray) -> dict[str, torch.Tensor]:
    from ast_core.calibration import collect_act_sq_mean
    stats = collect_act_sq_mean(model, [torch.from_numpy(blocks[:4].astype(np.int64))])
    return {name: s.sqrt() for name, s in stats.items()}


def test_wanda_scored_refresh_uses_the_frozen_scales_and_resumes_bitwise(tmp_path: Path, blocks, teacher) -> None:
    """refresh_score='wanda' refreshes by |W|·scale (not magnitude) and a resume takes the
    scales from the checkpoint: the interrupted run ends where the uninterrupted one does."""
    from ast_core.refresh import magnitude_nm_mask
    cfg = _cfg(method="ast-naive", refresh_score="wanda", lr=3e-2)
    full = _student(boosted=False)
    scale = _wanda_scale(full, blocks)
    for resume in (False, True):  # nothing to resume from is a fresh start: the scales must come in
        with pytest.raises(ValueError, match="needs refresh_scale"):
            train(_student(boosted=False), blocks, cfg, seed=0, teacher=OnlineTeacher(teacher),
                  checkpoint_dir=tmp_path / "x", progress=False, resume=resume)
    train(full, blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "a",
          progress=False, refresh_scale=scale)
    # steps == 6 and refresh_every == 2: the final mask is the Wanda-scored mask of the final weights
    for name, layer in sparse_layers(full):
        assert torch.equal(layer.mask, magnitude_nm_mask(layer.weight, 2, 4, scale[name])), name
    assert any(not torch.equal(l.mask, nm_mask(l.weight.abs())) for _, l in sparse_layers(full))

    part = _student(boosted=False)
    train(part, blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "b",
          progress=False, stop_after=3, refresh_scale=scale)
    resumed = _student(boosted=False)  # no scale passed: the checkpoint holds it
    train(resumed, blocks, cfg, seed=0, teacher=OnlineTeacher(teacher), checkpoint_dir=tmp_path / "b",
          resume=True, progress=False)
    a, b = _final_state(full), _final_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # a magnitude-refresh checkpoint cannot silently resume as a Wanda-refresh run
    train(_student(boosted=False), blocks, _cfg(method="ast-naive"), seed=0, teacher=OnlineTeacher(teacher),
          checkpoint_dir=tmp_path / "c", progress=False, stop_after=2)
    with pytest.raises(ValueError, match="no refresh column scales"):
        train(_student(boosted=False), blocks, cfg, seed=0, teacher=OnlineTeacher(teacher),
              checkpoint_dir=tmp_path / "c", resume=True, progress=False)
