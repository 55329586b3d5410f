"""The prepared GPU run of issue #18, on CPU: the ladder on tiny:llama, the weights' pack/unpack, the inference plan.

Nothing here needs a GPU; what the GPU measures is never asserted, only that the
scripts run, keep their promises (one initial mask, same tokens, sha256 checks) and
write the tables.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu_inference as gi
from bench import gpu_ladder as gl

REPO = Path(__file__).resolve().parents[1]
PRESET = str(REPO / "params" / "smollm2-quick.yaml")


def _pack_module():  # scripts/device is no package: load the file the driver runs
    spec = importlib.util.spec_from_file_location("pack_weights", REPO / "scripts" / "device" / "pack_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- the ladder

def test_rung_configs_are_the_fair_ladders() -> None:
    args = Namespace(seed=0, model="tiny:llama", batch=8, curve_points=4, overrides=[])
    steps = 400
    cfg = {r: gl.rung_config(PRESET, r, steps, args, 256) for r in ("fixed-kd-u2", "ast-paper", "ast-official")}
    paper, official, fixed = cfg["ast-paper"].train, cfg["ast-official"].train, cfg["fixed-kd-u2"].train
    assert paper.lambda_max == pytest.approx(1e-4 * 40_000 / steps) and paper.t0 == steps // 4
    assert paper.second_moment == "update" and paper.refresh_score == "magnitude"
    assert official.refresh_score == "wanda" and (official.lambda_max, official.t0) == (paper.lambda_max, paper.t0)
    assert official.second_moment == "update" == fixed.second_moment and gl.TRAINED[1:] == ("ast-paper", "ast-official")
    assert fixed.spec.distils and not fixed.spec.adaptive
    assert {c.train.steps for c in cfg.values()} == {steps} and {c.train.batch_size for c in cfg.values()} == {8}
    assert {c.data.seq_len for c in cfg.values()} == {256} and {c.seed for c in cfg.values()} == {0}
    assert gl.budget(0.5, 16384, 75, 0.9) == 135 and gl.budget(10.0, 1, 1, 1.0) == 4  # at least 4 steps


def test_data_manifest_refuses_a_changed_file(tmp_path: Path) -> None:
    arrays = {n: np.arange(64, dtype=np.uint16).reshape(4, 16) for n in ("train", "val", "calib")}
    arrays["wikitext2_test"] = np.arange(100, dtype=np.uint16)
    gl.write_data(tmp_path, arrays, {"counts": {}})
    got, manifest = gl.load_data(tmp_path)
    assert np.array_equal(got["train"], arrays["train"]) and manifest["files"]["val"]["shape"] == [4, 16]
    np.save(tmp_path / "val.npy", arrays["val"] + 1)
    with pytest.raises(SystemExit, match="sha256"):
        gl.load_data(tmp_path)


def test_gpu_ladder_runs_on_cpu_and_writes_the_tables(tmp_path: Path, shared_data: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    assert gl.main(["prepare", "--out", str(data), "--model", "tiny:llama", "--sources", "c4", "--max-docs", "30",
                    "--seq-len", "64", "--val-blocks", "4", "--calib-blocks", "4", "--max-wiki-tokens", "1500"]) == 0
    # the budget comes from the timing warm-up (--seconds-per-rung), as on the GPU
    rc = gl.main(["run", "--data", str(data), "--model", "tiny:llama", "--device", "cpu", "--precision", "fp32",
                  "--seconds-per-rung", "0.5", "--warm-steps", "4", "--batch", "2", "--curve-points", "2",
                  "--rungs", "fixed-kd-u2", "ast-paper", "oneshot-sparsegpt", "--set", "evaluate.seq_len=64",
                  "--set", "train.refresh_every=2", "--out-dir", str(out), "--tmp", str(tmp_path)])
    assert rc == 0
    report = json.loads((out / "gpu_ladder.json").read_text())
    rows = {r["rung"]: r for r in report["rows"]}
    assert set(rows) == {"dense", "fixed-kd-u2", "ast-paper", "oneshot-sparsegpt"}
    steps = report["budget"]["steps"]
    assert steps >= 4 and report["budget"]["step_s"] > 0
    assert rows["fixed-kd-u2"]["tokens"] == rows["ast-paper"]["tokens"] == steps * 2 * 64  # same tokens per rung
    assert rows["oneshot-sparsegpt"]["tokens"] == 0
    for r in rows.values():
        assert np.isfinite(r["ppl_mean"]) and r["windows"] == 1500 // 64 and r["ppl_ci95"][0]
    assert rows["ast-paper"]["ratio_to_control"] and rows["ast-paper"]["mask_change_vs_init"] is not None
    assert rows["fixed-kd-u2"]["tokens_per_s"] > 0
    assert all(len(pts) >= 2 for pts in report["curves"].values())  # the ppl-vs-tokens curve: start + end
    # one initial mask for every trained rung: the second student's recomputed Wanda mask matched it bit for bit
    assert [j["info"]["initial_mask_bits_recomputed_differently"] for j in report["jobs"]
            if j["job"]["rung"] in ("fixed-kd-u2", "ast-paper")] == [0, 0]
    md = (out / "gpu_ladder.md").read_text()
    assert "| budget (tokens) | rung |" in md and "ppl / its fixed-mask control, paired" in md and "Verdicts" in md


# ----------------------------------------------------------------------------- the weights

def test_pack_stash_unpack_roundtrip_with_sha256(tmp_path: Path) -> None:
    pw = _pack_module()
    src = tmp_path / "model.gguf"
    payload = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    src.write_bytes(payload)
    m = pw.split_file(src, tmp_path / "weights", part_bytes=4096)
    assert len(m["parts"]) == 3 and sum(p["bytes"] for p in m["parts"]) == len(payload)
    assert max(p["bytes"] for p in m["parts"]) <= 4096
    # call 1 stashes part 0 (and only part 0 travels with it); call 2 brings the rest
    stash = tmp_path / "stash"
    assert pw.main(["stash", str(tmp_path / "weights" / "part-0"), "--to", str(stash)]) == 0
    dest = tmp_path / "joined" / "model.gguf"
    got = pw.join_parts([tmp_path / "weights" / "part-1", tmp_path / "weights" / "part-2", stash], dest)
    assert dest.read_bytes() == payload and got["sha256"] == hashlib.sha256(payload).hexdigest()
    # a part missing (call 2 on a fresh machine) or damaged is refused by name
    with pytest.raises(FileNotFoundError, match="part0"):
        pw.join_parts([tmp_path / "weights" / "part-1", tmp_path / "weights" / "part-2"], dest)
    bad = tmp_path / "weights" / "part-1" / f"{src.name}.part1"
    bad.write_bytes(b"x" + bad.read_bytes()[1:])
    with pytest.raises(ValueError, match="sha256"):
        pw.join_parts([tmp_path / "weights" / "part-1", tmp_path / "weights" / "part-2", stash], dest)


def test_tensor_digest_sees_values_not_layout(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    pw = _pack_module()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    t = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(4)}
    save_file(t, a / "model.safetensors")
    save_file(dict(reversed(list(t.items()))), b / "model.safetensors", metadata={"format": "pt"})
    assert pw.tensor_digest(a) == pw.tensor_digest(b)
    save_file({**t, "y": torch.ones(4) * 1.0001}, b / "model.safetensors")
    assert pw.tensor_digest(a)["sha256"] != pw.tensor_digest(b)["sha256"]


# ----------------------------------------------------------------------------- inference

def test_gpu_inference_dry_run_prints_the_plan_and_bounds(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gi.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    plan = json.loads((tmp_path / "gpu_inference_plan.json").read_text())
    assert set(plan["models"]) == {"llama2-7b", "smollm2-135m"} and "random" in plan["weights"]
    llama = plan["models"]["llama2-7b"]
    assert llama["params"]["total"] == 6_738_415_616  # LLaMA-2-7B's parameter count
    bounds = [d["bound"] for d in llama["decode"]]
    assert bounds == sorted(bounds, reverse=True) and 1.0 < bounds[-1] < bounds[0] < 1 / 0.5625
    assert llama["decode"][0]["linear_only_bound"] == pytest.approx(1.7778, abs=1e-3)
    assert "memory-bound limit" in capsys.readouterr().out


def test_gpu_inference_runs_dense_on_cpu_and_skips_the_kernels(tmp_path: Path) -> None:
    rc = gi.main(["--device", "cpu", "--models", "tiny", "--prompts", "32", "--batches", "1", "2", "--context", "16",
                  "--iters", "2", "--warmup", "1", "--out-dir", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "gpu_inference.json").read_text())
    v = report["results"][0]["variants"]
    assert [r["prompt"] for r in v["dense"]["prefill"]] == [32] and v["dense"]["prefill"][0]["eager_tok_s"] > 0
    assert [r["batch"] for r in v["dense"]["decode"]] == [1, 2] and "error" not in v["dense"]["decode"][1]
    assert all("CUDA" in v[k]["skipped"] for k in gi.VARIANTS if k != "dense")
    assert "random weights" in (tmp_path / "gpu_inference.md").read_text()


def test_driver_script_parses() -> None:
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "device" / "run_gpu.sh")], check=True)
