"""Training on CUDA computes what training on the CPU computes (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ast_core.kernels import cuda_available
from ast_core.masks import mask_is_exact
from ast_core.sparse import sparse_layers
from ast_core.teacher_cache import build_cache, fingerprint
from ast_core.train import CachedTeacher, OnlineTeacher, train

from support.ddp_reference import SEED, blocks, student, teacher  # noqa: E402
from tasks.config import TrainConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=cuda_available()[1])
CFG = TrainConfig(method="ast-boosted", steps=6, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                  lambda_max=1e-2, t0_steps=2, refresh_every=2, checkpoint_every=3, slorb_group=16,
                  eval_every=3, refresh_score="magnitude")  # no calibration statistics here


@needs_cuda
@pytest.mark.parametrize("source", ["online", "cache"])
def test_cuda_training_matches_cpu(tmp_path: Path, source: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    data = blocks()
    val = data[:2]
    fp = fingerprint(teacher="t", tokenizer="x", data="d", seq_len=16, fmt="topk", k=64, samples=0,
                     temperature=CFG.temperature, seed=SEED)
    cache = build_cache(tmp_path / "cache", teacher(), data, fp, batch_size=4, progress=False)
    runs = {}
    for device in ("cpu", "cuda"):
        model = student().to(device)
        src = OnlineTeacher(teacher().to(device)) if source == "online" else CachedTeacher(cache)
        res = train(model, data, CFG, seed=SEED, teacher=src, checkpoint_dir=tmp_path / device, progress=False,
                    val_blocks=val)
        runs[device] = (model.to("cpu"), res)
    (cpu_model, cpu_res), (gpu_model, gpu_res) = runs["cpu"], runs["cuda"]
    assert [h.get("loss") for h in gpu_res.history] == pytest.approx([h.get("loss") for h in cpu_res.history],
                                                                     rel=1e-3, abs=1e-4)
    assert [h.get("val_ppl") for h in gpu_res.history] == pytest.approx(
        [h.get("val_ppl") for h in cpu_res.history], rel=1e-3)
    for (name, a), (_, b) in zip(sparse_layers(cpu_model), sparse_layers(gpu_model)):
        assert mask_is_exact(b.mask, 2, 4), name
        assert (a.mask != b.mask).float().mean() < 1e-3, name  # ties may break differently, rarely
    # a CUDA run resumes from its checkpoint like a CPU run
    again = student().to("cuda")
    src = OnlineTeacher(teacher().to("cuda")) if source == "online" else CachedTeacher(cache)
    part = train(again, data, CFG, seed=SEED, teacher=src, checkpoint_dir=tmp_path / "resume", progress=False,
                 stop_after=4)
    assert part.steps == 4
    again = student().to("cuda")
    res = train(again, data, CFG, seed=SEED, teacher=src, checkpoint_dir=tmp_path / "resume", progress=False,
                resume=True)
    assert res.resumed_from == 3 and res.steps == 6
    ref = dict(gpu_model.state_dict())
    for k, v in again.to("cpu").state_dict().items():
        assert torch.allclose(v.float(), ref[k].float(), rtol=1e-4, atol=1e-5), k
