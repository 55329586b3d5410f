"""Checkpoints: atomic, safetensors-only, tied weights, optimizer state round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ast_core.atomic import atomic_write_json
from ast_core.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_model_tensors, save_checkpoint
from ast_core.models import load_model
from ast_core.sparse import sparsify


def _model_and_opt():
    model = load_model("tiny:llama", seed=1)
    sparsify(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(torch.randint(0, 500, (2, 8))).logits.square().mean()
    loss.backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_masks_and_optimizer(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 3, model, opt, {"x": torch.arange(4)}, {"tokens": 12})
    assert latest_checkpoint(tmp_path) == path
    ck = load_checkpoint(path)
    assert ck.state["step"] == 3 and ck.state["tokens"] == 12
    fresh = load_model("tiny:llama", seed=9)
    sparsify(fresh)
    load_model_tensors(fresh, ck.model, "ckpt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ck.optimizer)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"])
    assert torch.equal(ck.extra["x"], torch.arange(4))


def test_only_the_last_two_are_kept_and_temp_dirs_are_cleaned(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    (tmp_path / ".step_000001.crashed").mkdir(parents=True)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {}, {"tokens": 0})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_000002", "step_000003"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, model, opt, {}, {"tokens": 0})
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_checkpoint_for_another_model_is_refused(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    path = save_checkpoint(tmp_path, 1, model, opt, {}, {"tokens": 0})
    other = load_model("tiny:gpt2")
    sparsify(other)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_tensors(other, load_checkpoint(path).model, "ckpt")


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"k": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
