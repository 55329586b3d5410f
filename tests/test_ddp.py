"""Training under ``torchrun --nproc_per_node=2`` (gloo, CPU) matches one process at the same global batch.

Two ranks each take half of every global batch, read only their blocks of the
teacher cache, and average gradients; the loss trajectory must match the
single-process run within float tolerance, the masks must be identical on both
ranks (and to the single-process masks), and a run interrupted and resumed
under DDP must end bitwise where the uninterrupted DDP run ends. The same holds
with ``train.parallel: fsdp`` (parameters and optimizer state sharded by rows),
whose checkpoints are full state dicts that one process resumes from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ast_core.checkpoint import state_dict_tensors  # noqa: E402
from ast_core.distributed import DistEnv, DistributedError, local_batch, mask_checksums, my_blocks  # noqa: E402
from ast_core.teacher_cache import build_cache, fingerprint  # noqa: E402
from ast_core.train import CachedTeacher, train  # noqa: E402
from tests.support.ddp_reference import (CFG, SEED, UPDATE_DRIFT, assert_matches_reference, blocks,  # noqa: E402
                                         single_thread, student, teacher, update_drift)

WORKER = REPO / "tests" / "support" / "ddp_worker.py"


def test_each_rank_takes_a_disjoint_slice_of_the_global_batch() -> None:
    import numpy as np
    ids = np.arange(10, 18)
    parts = [my_blocks(ids, DistEnv(rank=r, world_size=4)) for r in range(4)]
    assert [p.tolist() for p in parts] == [[10, 11], [12, 13], [14, 15], [16, 17]]
    assert my_blocks(ids, DistEnv()).tolist() == ids.tolist()
    with pytest.raises(DistributedError, match=r"train.batch_size \(6\).*divisible.*\(4\)"):
        local_batch(6, DistEnv(rank=0, world_size=4))


def test_dist_env_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    env = DistEnv.from_env()
    assert (env.rank, env.world_size, env.local_rank, env.enabled, env.is_main) == (2, 4, 0, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match="rank 4 is not in a world of size 4"):
        DistEnv.from_env()


def test_mask_checksums_tell_masks_apart() -> None:
    a = {"l": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)}
    b = {"l": torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)}  # same count, other positions
    assert torch.equal(mask_checksums(a), mask_checksums({"l": a["l"].clone()}))
    assert not torch.equal(mask_checksums(a), mask_checksums(b))


def _torchrun(out: Path, cache: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           str(out), str(cache), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def _single_process_reference(tmp_path: Path, cfg=CFG):  # type: ignore[no-untyped-def]
    """The teacher cache at ``tmp_path/cache`` and the one-process run the ranks must match:
    (blocks, cache, trained student, its TrainResult). One intra-op thread, like every rank."""
    data = blocks()
    fp = fingerprint(teacher="t", tokenizer="x", data="d", seq_len=16, fmt="topk", k=64, samples=0,
                     temperature=CFG.temperature, seed=SEED)
    with single_thread():
        cache = build_cache(tmp_path / "cache", teacher(), data, fp, batch_size=4, progress=False)
        single = student()
        ref = train(single, data, cfg, seed=SEED, teacher=CachedTeacher(cache),
                    checkpoint_dir=tmp_path / "single", progress=False)
    return data, cache, single, ref


def test_the_reference_bound_rejects_a_run_on_another_batch(tmp_path: Path) -> None:
    """What a rank that skips the gradient all-reduce does (train on its half of every global
    batch) drifts far outside the bound the data-parallel runs are held to; the same run
    again stays inside it (the bound is not blind, and not tighter than determinism)."""
    _, _, single, _ = _single_process_reference(tmp_path / "a")
    _, _, again, _ = _single_process_reference(tmp_path / "b")
    _, _, half, _ = _single_process_reference(tmp_path / "c", CFG.model_copy(update={"batch_size": 2}))
    init, ref = state_dict_tensors(student()), state_dict_tensors(single)
    assert update_drift(state_dict_tensors(again), ref, init)[0] == 0.0
    drift, _ = update_drift(state_dict_tensors(half), ref, init)
    print(f"relative update drift of a half-batch run: {drift:.3g}")
    assert drift > 10 * UPDATE_DRIFT
    with pytest.raises(AssertionError):  # its masks differ too; either check alone would reject it
        assert_matches_reference(state_dict_tensors(half), ref, init)


@pytest.mark.slow
@pytest.mark.ci
def test_two_process_ddp_matches_one_process_and_resumes(tmp_path: Path) -> None:
    data, cache, single, ref = _single_process_reference(tmp_path)

    _torchrun(tmp_path / "ddp", tmp_path / "cache")
    _torchrun(tmp_path / "ddp_resumed", tmp_path / "cache", "--interrupt-at", "3")

    runs = {name: [json.loads((tmp_path / name / f"rank{r}.json").read_text()) for r in (0, 1)]
            for name in ("ddp", "ddp_resumed")}
    r0, r1 = runs["ddp"]
    assert r0["sharded"] == [] and not r0["model_sharded"]  # DDP replicates
    # rank-disjoint cache reads: per step the two ranks' blocks are disjoint halves of the global batch
    assert len(r0["read"]) == len(r1["read"]) == CFG.steps
    from ast_core.train import BlockOrder
    order = BlockOrder(len(data), SEED)
    for step, (a, b) in enumerate(zip(r0["read"], r1["read"])):
        assert not set(a) & set(b)
        assert a + b == order.ids(step * CFG.batch_size, CFG.batch_size).tolist()

    # the loss trajectory (the mean over ranks) matches the single process at the same global batch
    losses = [h["loss"] for h in r0["history"] if "loss" in h]
    assert len(losses) == CFG.steps
    assert losses == pytest.approx([h["loss"] for h in ref.history if "loss" in h], rel=1e-4, abs=1e-5)
    assert [h["loss"] for h in r1["history"]] == [h["loss"] for h in r0["history"]]  # same logged values

    ranks = [load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1)]
    for k, v in ranks[0].items():  # both ranks hold the same model: weights bitwise, masks identical
        assert torch.equal(v, ranks[1][k]), k
    ddp_masks, one_masks = _masks(ranks[0]), _masks(state_dict_tensors(single))
    assert ddp_masks.keys() == one_masks.keys() and len(ddp_masks) == 14
    # masks identical, weights within the summation-order drift bound (tests/support/ddp_reference.py)
    assert_matches_reference(ranks[0], state_dict_tensors(single), state_dict_tensors(student()))
    assert any(h.get("flip_rate_init", 0) > 0 for h in r0["history"])  # the masks did adapt

    # resumed under DDP from the step-2 checkpoint: bitwise the uninterrupted DDP run
    resumed = [load_file(str(tmp_path / "ddp_resumed" / f"rank{r}.safetensors")) for r in (0, 1)]
    assert runs["ddp_resumed"][0]["resumed_from"] == 2
    for state in resumed:
        for k, v in ranks[0].items():
            assert torch.equal(v, state[k]), k
    # only rank 0 wrote checkpoints
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["latest", "step_000004",
                                                                                    "step_000006"]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_tiny_preset_stage_train_under_torchrun_matches_one_process(tmp_path: Path, parallel: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The product's own launch: ``torchrun --nproc_per_node=2 -m tasks.cli stage train --params params/tiny.yaml``
    (FSDP with validation on: every rank must join the validation forward)."""
    from tasks.cli import main
    tiny = str(REPO / "params" / "tiny.yaml")
    fast = ["--no-progress", "--set", "train.steps=8", "--set", "train.refresh_every=2",
            "--set", f"train.eval_every={4 if parallel == 'fsdp' else 0}", "--set", f"train.parallel={parallel}"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the one-process run reduces with one thread, as each rank
    with single_thread():
        for out in ("one", "two"):
            for stage in ("prepare", "cache-teacher"):
                assert main(["stage", stage, "--params", tiny, "--out", str(tmp_path / out), *fast]) == 0
        assert main(["stage", "train", "--params", tiny, "--out", str(tmp_path / "one"), *fast]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "AST_TRACKING": "off"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tasks.cli",
           "stage", "train", "--params", tiny, "--out", str(tmp_path / "two"), *fast]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def history(out: str) -> list[dict]:
        lines = (tmp_path / out / "train" / "history.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    one, two = history("one"), history("two")
    assert [h["step"] for h in two] == [h["step"] for h in one]
    assert [h["step"] for h in one if "loss" in h] == list(range(1, 9))
    def series(hist: list[dict], key: str) -> list[float]:
        return [h[key] for h in hist if key in h]

    assert series(two, "loss") == pytest.approx(series(one, "loss"), rel=1e-4, abs=1e-5)
    assert [h["tokens"] for h in two] == [h["tokens"] for h in one]  # global tokens, not one rank's
    assert series(two, "val_ppl") == pytest.approx(series(one, "val_ppl"), rel=1e-4)
    assert len(series(two, "val_ppl")) == (3 if parallel == "fsdp" else 0)  # steps 0, 4, 8
    a = load_file(str(tmp_path / "one" / "train" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "train" / "final" / "model.safetensors"))
    masks = [k for k in a if k.endswith(".mask")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)
    assert json.loads((tmp_path / "two" / "train" / "done.json").read_text())["steps"] == 8


def test_other_stages_refuse_to_run_under_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from tasks.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(["stage", "prepare", "--params", str(REPO / "params" / "tiny.yaml"), "--out", str(tmp_path / "x")])
    assert code == 2 and "only `stage train` runs under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.ci
def test_two_process_fsdp_matches_one_process_and_resumes_at_any_world_size(tmp_path: Path) -> None:
    from ast_core.checkpoint import latest_checkpoint, load_checkpoint
    data, cache, single, ref = _single_process_reference(tmp_path)
    _torchrun(tmp_path / "fsdp", tmp_path / "cache", "--fsdp")
    _torchrun(tmp_path / "fsdp_resumed", tmp_path / "cache", "--fsdp", "--interrupt-at", "3")

    r0, r1 = [json.loads((tmp_path / "fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # every parameter was a row shard, the sparse weights included
    assert len(r0["sharded"]) == len(list(single.parameters())) and any(".mlp." in n for n in r0["sharded"])
    assert r0["model_sharded"]  # what the train stage asks before gathering the final weights
    losses = [h["loss"] for h in r0["history"] if "loss" in h]
    assert losses == pytest.approx([h["loss"] for h in ref.history if "loss" in h], rel=1e-4, abs=1e-5)
    assert [h["loss"] for h in r1["history"]] == [h["loss"] for h in r0["history"]]
    assert any(h.get("flip_rate_init", 0) > 0 for h in r0["history"])  # the masks did adapt

    ranks = [load_file(str(tmp_path / "fsdp" / f"rank{r}.safetensors")) for r in (0, 1)]
    one, init = state_dict_tensors(single), state_dict_tensors(student())
    assert ranks[0].keys() == one.keys()  # gathered whole, tied weights once, as one process saves
    for k, v in ranks[0].items():
        assert torch.equal(v, ranks[1][k]), k  # both ranks gathered the same full model
        assert v.shape == one[k].shape, k
    # the sharded decay + gathered refresh pick the same masks; weights within the drift bound
    assert_matches_reference(ranks[0], one, init)

    # interrupted at step 3 and resumed under FSDP from step 2: bitwise the uninterrupted FSDP run
    assert json.loads((tmp_path / "fsdp_resumed" / "rank0.json").read_text())["resumed_from"] == 2
    for r in (0, 1):
        resumed = load_file(str(tmp_path / "fsdp_resumed" / f"rank{r}.safetensors"))
        for k, v in ranks[0].items():
            assert torch.equal(v, resumed[k]), k

    # the FSDP checkpoint is a full state dict (weights and optimizer state at full shape):
    # one process resumes from its step-4 checkpoint and finishes where the FSDP run did
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "fsdp" / "checkpoints"))
    assert ckpt.state["world_size"] == 2 and ckpt.state["step"] == 6
    mid = tmp_path / "mid"
    mid.mkdir()
    import shutil
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_000004", mid / "step_000004")
    (mid / "latest").write_text("step_000004\n")
    one_proc = student()
    with single_thread():
        res = train(one_proc, data, CFG, seed=SEED, teacher=CachedTeacher(cache), checkpoint_dir=mid,
                    resume=True, progress=False)
    assert res.resumed_from == 4
    assert_matches_reference(state_dict_tensors(one_proc), ranks[0], init)
