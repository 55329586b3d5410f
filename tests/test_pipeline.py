"""The whole pipeline on the tiny preset, through the CLI: the one code path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tasks.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "params" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert main(["run", "--params", TINY, "--out", str(out), "--no-progress"]) == 0
    return out


def test_run_writes_metrics_and_a_stock_hf_export(tiny_run: Path) -> None:
    m = json.loads((tiny_run / "metrics.json").read_text())
    for key in ("ppl_wikitext2", "ppl_wikitext2_dense", "zero_shot", "tokens_trained", "flip_rate_final", "method"):
        assert key in m, key
    assert m["method"] == "ast-boosted" and m["tokens_trained"] == 20 * 4 * 64
    assert set(m["zero_shot"]) == {"boolq", "piqa"} and all(0 <= v <= 1 for v in m["zero_shot"].values())
    assert (tiny_run / "export" / "hf" / "config.json").exists()
    assert 0.5 < m["compressed_ratio"] <= 0.5626  # values + 2-bit positions vs dense bytes
    history = [json.loads(line) for line in (tiny_run / "train" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 20 and any("flip_rate_prev" in h for h in history)


def test_verify_passes_on_the_export_and_fails_on_a_broken_group(tiny_run: Path, tmp_path: Path, capsys) -> None:
    hf = tiny_run / "export" / "hf"
    assert main(["verify", str(hf)]) == 0
    broken = tmp_path / "hf"
    subprocess.run(["cp", "-r", str(hf), str(broken)], check=True)
    st = broken / "model.safetensors"
    tensors = load_file(str(st))
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name][0, :4] = 1.0  # four non-zeros in one group of four
    save_file(tensors, str(st), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(broken)]) == 1
    assert "down_proj" in capsys.readouterr().out


def test_a_second_run_skips_finished_stages(tiny_run: Path, caplog) -> None:
    before = (tiny_run / "train" / "final" / "model.safetensors").stat().st_mtime_ns
    caplog.set_level("INFO")
    assert main(["run", "--params", TINY, "--out", str(tiny_run), "--no-progress"]) == 0
    assert (tiny_run / "train" / "final" / "model.safetensors").stat().st_mtime_ns == before
    assert "train: up to date" in caplog.text


def test_an_out_dir_of_another_run_is_refused(tiny_run: Path, capsys) -> None:
    rc = main(["run", "--params", TINY, "--out", str(tiny_run), "--set", "train.steps=21", "--no-progress"])
    assert rc == 2
    assert "different run" in capsys.readouterr().err


# A fresh interpreter that cannot import project code: the editable install's finder is
# dropped, no sys.path entry holds ast_core/tasks/flows, and any import of them fails.
_NO_PROJECT = """
import importlib.abc, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                    and "editable" not in repr(f).lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not any(os.path.isdir(os.path.join(p or ".", pkg, "")) and
               os.path.isfile(os.path.join(p or ".", pkg, "__init__.py")) for pkg in ("ast_core", "tasks", "flows"))]
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ast_core", "tasks", "flows"):
            raise ImportError(f"project code imported in the stock-tools process: {name}")
sys.meta_path.insert(0, _Refuse())
"""


def _stock_python(code: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
           "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "")}
    return subprocess.run([sys.executable, "-c", _NO_PROJECT + code], cwd=cwd, capture_output=True, text=True,
                          env={k: v for k, v in env.items() if v}, timeout=timeout)


def test_stock_transformers_and_peft_load_generate_and_reproduce_the_perplexity(tiny_run: Path, tmp_path: Path) -> None:
    """A user's process (transformers + peft, no project code): same WikiText-2 ppl as metrics.json."""
    from tests.conftest import SHARED_DATA
    m = json.loads((tiny_run / "metrics.json").read_text())
    hf = tiny_run / "export" / "hf"
    assert m["evaluated"] == "export/hf + export/hf/adapter" and m["export_check"]["ok"]
    code = f"""
import json, math, torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
try:
    import ast_core
    raise SystemExit("ast_core importable")
except ImportError:
    pass
hf, raw = {str(hf)!r}, {str(SHARED_DATA / "wikitext-2-raw-v1" / "wiki.test.raw")!r}
tok = AutoTokenizer.from_pretrained(hf)
rows = [l if l.strip() else "" for l in open(raw, encoding="utf-8").read().split("\\n")[:-1]]
ids = tok("\\n\\n".join(r + "\\n" if r else "" for r in rows), return_tensors="pt")["input_ids"][0]

def ppl(model, L={m["ppl_seq_len"]}, n={m["ppl_windows"]}):
    w = ids[: n * L].view(n, L)
    with torch.no_grad():
        logits = model(input_ids=w).logits
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    return math.exp(nll.item())

base = AutoModelForCausalLM.from_pretrained(hf).eval()
out = {{"base": ppl(base)}}
model = PeftModel.from_pretrained(base, hf + "/adapter").eval()
out["boosted"] = ppl(model)
gen = model.generate(**tok("The history of", return_tensors="pt"), max_new_tokens=5, do_sample=False)
out["new_tokens"] = int(gen.shape[1]) - len(tok("The history of")["input_ids"])
print(json.dumps(out))
"""
    res = _stock_python(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["new_tokens"] == 5
    assert got["boosted"] == pytest.approx(m["ppl_wikitext2"], rel=1e-5)
    assert got["boosted"] == pytest.approx(m["ppl_wikitext2_trained"], rel=m["export_check"]["ppl_rtol"])
    assert got["base"] == pytest.approx(m["ppl_wikitext2_base_only"], rel=1e-5)
    # the adapter is the SLoRB branch: it moves the perplexity by far more than the 1e-5 the stock and our numbers
    # agree to (the tiny random model is near-uniform, so its S moves it by ~4e-4 only)
    assert got["base"] != pytest.approx(got["boosted"], rel=1e-4)


def test_stock_lm_eval_cli_with_peft_reproduces_the_sparse_zero_shot(tiny_run: Path, tmp_path: Path,
                                                                    capsys) -> None:
    """`lm_eval --model hf --model_args pretrained=<export>,peft=<adapter> --include_path <tasks-path>`."""
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert main(["tasks-path", "--tasks", ",".join(m["zero_shot"])]) == 0
    include = capsys.readouterr().out.strip().splitlines()[-1]
    assert Path(include, "piqa.yaml").is_file()
    hf = tiny_run / "export" / "hf"
    cfg = __import__("yaml").safe_load(Path(TINY).read_text())["evaluate"]["zero_shot"]
    argv = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={hf},peft={hf / 'adapter'}",
            "--include_path", include, "--tasks", ",".join(m["zero_shot"]), "--num_fewshot", "0",
            "--limit", str(cfg["limit"]), "--batch_size", "8", "--device", "cpu",
            "--output_path", str(tmp_path / "out")]
    code = f"""
import sys
sys.argv = {argv!r}
from lm_eval.__main__ import cli_evaluate
cli_evaluate()
"""
    res = _stock_python(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["model_args"] == {"pretrained": str(hf), "peft": str(hf / "adapter")}
    got = {t: results["results"][t]["acc,none"] for t in m["zero_shot"]}
    assert got == m["zero_shot"] == m["zero_shot_trained"]
    assert {t: results["n-samples"][t]["effective"] for t in got} == m["zero_shot_docs"]


def test_evaluate_model_cli_scores_the_export_on_the_same_windows(tiny_run: Path, tmp_path: Path) -> None:
    m = json.loads((tiny_run / "metrics.json").read_text())
    hf = tiny_run / "export" / "hf"
    out = tmp_path / "scores.json"
    assert main(["evaluate-model", str(hf), "--adapter", str(hf / "adapter"), "--params", TINY,
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["ppl_wikitext2"] == pytest.approx(m["ppl_wikitext2"], rel=1e-9)
    assert got["zero_shot"] == m["zero_shot"] and got["ppl_windows"] == m["ppl_windows"]
    assert main(["evaluate-model", str(hf), "--params", TINY, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ppl_wikitext2"] == pytest.approx(m["ppl_wikitext2_base_only"], rel=1e-9)


def test_evaluate_model_refuses_a_mismatched_or_broken_adapter(tiny_run: Path, tmp_path: Path, capsys) -> None:
    hf = tiny_run / "export" / "hf"
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(hf), str(other)], check=True)
    t = load_file(str(other / "model.safetensors"))
    name = next(k for k in t if k.endswith("mlp.down_proj.weight"))
    t[name] = t[name] * 2  # another base with the same shapes (still 2:4)
    save_file(t, str(other / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["evaluate-model", str(other), "--adapter", str(hf / "adapter"), "--params", TINY]) == 2
    err = capsys.readouterr().err
    assert "exported for another base" in err and "Traceback" not in err
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(hf / "adapter"), str(broken)], check=True)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["r"] = cfg["lora_alpha"] = cfg["r"] * 2  # the tensors no longer fit the config
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["evaluate-model", str(hf), "--adapter", str(broken), "--params", TINY]) == 2
    assert "lora_A.weight has shape" in capsys.readouterr().err


def test_an_export_that_does_not_score_like_the_trained_model_fails_the_evaluate_stage(
        tiny_run: Path, tmp_path: Path, capsys) -> None:
    """A tampered adapter (S scaled and shifted): evaluate writes both numbers to metrics.json and exits 2."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(tiny_run), str(run)], check=True)
    (run / "evaluate" / "done.json").unlink()
    f = run / "export" / "hf" / "adapter" / "adapter_model.safetensors"
    t = load_file(str(f))
    for k in t:
        if k.endswith("lora_B.weight"):
            t[k] = t[k] * 1.5 + 0.05  # the tiny model's S is ~1e-2: scaling alone barely moves its perplexity
    save_file(t, str(f), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["stage", "evaluate", "--params", TINY, "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not score what the trained model scored" in err and "Traceback" not in err
    m = json.loads((run / "metrics.json").read_text())
    assert not m["export_check"]["ok"] and m["ppl_wikitext2"] != m["ppl_wikitext2_trained"]
    assert not (run / "evaluate" / "done.json").exists()


def test_export_readme_is_a_model_card_with_the_measured_numbers(tiny_run: Path) -> None:
    import yaml
    m = json.loads((tiny_run / "metrics.json").read_text())
    card = (tiny_run / "export" / "hf" / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and {"sparsity", "2:4"} <= set(front["tags"])
    assert "base_model" not in front  # tiny:llama is a random model, not a hub model
    assert f"{m['ppl_wikitext2']:.2f}" in card and f"{m['ppl_wikitext2_base_only']:.2f}" in card
    assert f"{m['tokens_trained']:,}" in card and f"{m['ppl_windows']} windows × {m['ppl_seq_len']} tokens" in card
    assert 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("PATH"), "PATH/adapter")' in card
    assert "peft=PATH/adapter" in card and "--include_path" in card


@pytest.mark.parametrize("args, needle", [
    (["run", "--params", "params/nope.yaml"], "not found"),
    (["run", "--params", TINY, "--set", "train.lr=-1"], "train.lr"),
    (["run", "--params", TINY, "--set", "model.student=tiny:mamba"], "tiny:mamba"),
    (["run", "--params", TINY, "--set", "data.source=/no/such/file.jsonl"], "/no/such/file.jsonl"),
])
def test_bad_input_exits_non_zero_with_one_message(args, needle, tmp_path: Path, capsys) -> None:
    rc = main(args + ["--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err


def test_lstsq_slorb_init_fits_the_calibration_blocks_and_a_resume_keeps_the_trained_branch(
        tmp_path: Path, monkeypatch) -> None:
    """train.slorb_init=lstsq: the stage fits S to E[x zᵀ] of the prepared calibration blocks; an
    interrupted run resumes S from its checkpoint (no refit) and ends bitwise where an uninterrupted one does."""
    import torch
    from ast_core.calibration import collect_group_cross
    from tasks import cache_teacher, prepare, train as train_stage
    from tasks.common import RunContext, StageError
    from tasks.config import load_config

    monkeypatch.setenv("AST_TRACKING", "off")
    seen: list[dict | None] = []
    import ast_core.slorb
    real_add = ast_core.slorb.add_slorb

    def spy(model, group, trainable, cross=None):  # type: ignore[no-untyped-def]
        seen.append(cross)
        return real_add(model, group, trainable, cross)

    monkeypatch.setattr(ast_core.slorb, "add_slorb", spy)
    cfg = load_config(TINY, ["train.slorb_init=lstsq", "train.steps=6", "train.checkpoint_every=2",
                             "train.eval_every=0", "data.max_train_blocks=24"])

    def stages(out: Path, stop_after: int | None = None, resume: bool = False) -> RunContext:
        ctx = RunContext.create(cfg, out, resume=resume, progress=False)
        prepare.run(ctx)
        cache_teacher.run(ctx)
        try:
            train_stage.run(ctx, stop_after=stop_after)
        except StageError as err:  # only the interrupted call raises, and it says to resume
            assert stop_after is not None and "--resume" in str(err)
        return ctx

    whole = stages(tmp_path / "whole")
    ctx = RunContext.create(cfg, tmp_path / "whole", progress=False)
    from ast_core.models import load_model
    from ast_core.sparse import sparsify
    student = load_model(cfg.model.student, seed=cfg.seed)
    sparsify(student, cfg.sparsity.n, cfg.sparsity.m, cfg.sparsity.exclude)
    expected = collect_group_cross(student, train_stage._calib_batches(ctx), cfg.train.slorb_group)
    assert seen[0] is not None and seen[0].keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(seen[0][name], expected[name], rtol=0, atol=0)

    stages(tmp_path / "cut", stop_after=3)
    stages(tmp_path / "cut", resume=True)
    assert seen[1] is not None and seen[2] is None  # the resume loads S, it does not refit it
    a = load_file(str(whole.out / "train" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "train" / "final" / "model.safetensors"))
    assert any(k.endswith(".side.S") for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
