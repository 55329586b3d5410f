"""Teacher cache: exact targets, memory-mapped shards, refusal of mismatches and truncation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ast_core.distill import kl_from_targets, kl_full
from ast_core.teacher_cache import CacheMismatch, TeacherCache, build_cache, fingerprint, weights_hash
from support import tiny


# ``teacher``: tests/conftest.py's (seed 0)
@pytest.fixture(scope="module")
def blocks() -> np.ndarray:
    return tiny.blocks(n=5, seq_len=12, vocab=3000, seed=1)


def _fp(**kw):
    base = dict(teacher="t", tokenizer="tok", data="d", seq_len=12, fmt="topk", k=8, samples=0,
                temperature=2.0, seed=0)
    base.update(kw)
    return fingerprint(**base)


def test_cached_targets_match_the_teacher_and_shards_split_blocks(tmp_path: Path, teacher, blocks) -> None:
    cache = build_cache(tmp_path / "c", teacher, blocks, _fp(), batch_size=2, shard_blocks=2, progress=False)
    assert cache.n_shards == 3 and len(list((tmp_path / "c").glob("shard_00002.*.npy"))) == 3
    ids = np.array([4, 0, 3])
    t = cache.targets(ids)
    assert t["logp"].shape == (3, 12, 8) and t["logp"].dtype == torch.float16 and t["idx"].dtype == torch.int32
    with torch.no_grad():
        logits = teacher(torch.from_numpy(blocks[ids].astype(np.int64))).logits
    top = torch.log_softmax(logits / 2.0, -1).topk(8, dim=-1)
    assert torch.equal(t["idx"].long(), top.indices)
    assert torch.allclose(t["logp"].float(), top.values, rtol=1e-3, atol=0)  # fp16 storage
    assert cache.bytes_per_token == pytest.approx(8 * (2 + 4) + 4, rel=0.05)


def test_full_vocab_topk_cache_gives_the_full_kl(tmp_path: Path, teacher, blocks) -> None:
    vocab = teacher.config.vocab_size
    cache = build_cache(tmp_path / "c", teacher, blocks[:2], _fp(k=vocab), batch_size=2, progress=False)
    student = torch.randn(2, 12, vocab)
    with torch.no_grad():
        t_logits = teacher(torch.from_numpy(blocks[:2].astype(np.int64))).logits
    got = kl_from_targets(student, cache.targets(np.array([0, 1])), "topk", 2.0)
    assert got.item() == pytest.approx(kl_full(student, t_logits, 2.0).item(), rel=2e-3)


@pytest.mark.parametrize("change", [dict(k=16), dict(temperature=1.0), dict(data="other"), dict(teacher="u")])
def test_a_mismatched_cache_is_refused_saying_what_differs(tmp_path: Path, teacher, blocks, change) -> None:
    build_cache(tmp_path / "c", teacher, blocks, _fp(), batch_size=5, progress=False)
    key = next(iter(change))
    with pytest.raises(CacheMismatch, match=key):
        TeacherCache(tmp_path / "c", _fp(**change))


def test_sampled_fingerprint_depends_on_seed_topk_does_not() -> None:
    assert _fp(seed=1) == _fp(seed=2)
    assert _fp(fmt="sampled", samples=64, seed=1) != _fp(fmt="sampled", samples=64, seed=2)


def test_a_truncated_shard_is_refused(tmp_path: Path, teacher, blocks) -> None:
    build_cache(tmp_path / "c", teacher, blocks, _fp(), batch_size=5, progress=False)
    shard = next((tmp_path / "c").glob("shard_00000.logp.npy"))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(CacheMismatch, match="truncated"):
        TeacherCache(tmp_path / "c", _fp())


def test_sampled_cache_round_trips(tmp_path: Path, teacher, blocks) -> None:
    fp = _fp(fmt="sampled", samples=32, seed=3)
    a = build_cache(tmp_path / "a", teacher, blocks, fp, batch_size=2, progress=False)
    b = build_cache(tmp_path / "b", teacher, blocks, fp, batch_size=2, progress=False)
    ta, tb = a.targets(np.arange(5)), b.targets(np.arange(5))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # deterministic given the seed
    assert int(ta["counts"].sum()) == 5 * 12 * 32


def test_weights_hash_changes_with_any_weight(teacher) -> None:
    other = tiny.teacher(seed=0)
    assert weights_hash(teacher) == weights_hash(other)
    with torch.no_grad():
        other.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert weights_hash(teacher) != weights_hash(other)
