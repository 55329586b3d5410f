"""The benchmark report (bench/report.py) and the measurable parts of bench/cache_formats.py and
bench/compression.py, on synthetic results files and the tiny random LLaMA.

The report is what docs/RESULTS.md is: its verdicts must follow the numbers
(a 1.05 step overhead is a missed 1.03 goal), and a benchmark that has not run
must read "not measured yet", never crash the report.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402

STAMP = {"date": "2026-01-02 03:04 UTC", "commit": "abc1234", "machine": "x86_64, 2 CPU cores",
         "torch": "2.13.0", "threads": 2}


# ----------------------------------------------------------------------------- synthetic results

def _ladder() -> dict:
    def row(method: str, ppl: float, gap: float | None) -> dict:
        return {"method": method, "train_method": method, "ppl": ppl, "gap_closed": gap,
                "zero_shot": {"rte": 0.5, "piqa": 0.6}, "zero_shot_mean": 0.55, "tokens": 51200,
                "train_s": 900.0, "flip_rate_final": None}
    return {"stamp": STAMP, "params": "params/smollm2-quick.yaml", "model": "embedded:smollm2-135m",
            "command": "python bench/ladder.py --steps 100",
            "budget": {"steps": 100, "batch": 4, "seq_len": 128, "tokens": 51200},
            "evaluation": {"wikitext2_windows": 16, "seq_len": 512, "max_windows": 16,
                           "zero_shot": {"enabled": True, "tasks": ["rte", "piqa"], "limit": 40},
                           "val_blocks": 16, "val_seq_len": 128, "val_every": 25},
            "teacher_cache": {"enabled": True, "format": "topk", "k": 64},
            "rows": [row("dense", 20.0, 1.0), row("oneshot-sparsegpt", 80.0, 0.0), row("naive", 60.0, 1 / 3),
                     row("ast-naive", 50.0, 0.5), row("ast-boosted", 55.0, 5 / 12)],  # boosted worse than naive-AST
            "curves": {"naive": [[0, 100.0], [51200, 60.0]]}, "wall_s": 1.0}


def _sweep() -> dict:
    def row(name: str, lam: float, t0: int | None, ppl: float) -> dict:
        return {"name": name, "lambda_max": lam, "t0": t0, "t0_frac": None if t0 is None else 0.25, "ppl": ppl,
                "flip_rate_final": 0.001, "flips": [[10, 0.006], [40, 0.001]], "ratio": [[10, 0.34], [40, 0.27]],
                "curve": [[0, 150.0], [20480, 101.0]], "train_s": 100.0}
    return {"stamp": STAMP, "params": "params/smollm2-quick.yaml", "model": "embedded:smollm2-135m",
            "command": "python bench/decay_sweep.py --steps 40", "method": "ast-naive",
            "budget": {"steps": 40, "batch": 4, "seq_len": 128, "tokens": 20480}, "refresh_every": 10,
            "evaluation": {}, "rows": [row("lambda0", 0.0, None, 174.0), row("lam0.002_t0-10", 2e-3, 10, 101.0)],
            "best": {"name": "lam0.002_t0-10", "lambda_max": 2e-3, "t0": 10, "t0_frac": 0.25, "ppl": 101.0},
            "scaling": {"steps": 40, "best_lambda_max": 2e-3, "best_t0": 10, "lambda_steps": 0.08}}


def _step_overhead(ratio: float) -> dict:
    part = lambda s: {"median_s": s, "mean_s": s, "min_s": s, "max_s": s}  # noqa: E731
    return {"model": "embedded:smollm2-135m", "batch": 2, "seq_len": 128, "measured_steps": 30, "warmup_steps": 3,
            "refresh_every": 10, "lambda": 1e-4,
            "plain": {"step": part(1.0), "fwd_bwd": part(0.8), "opt": part(0.2)},
            "ast": {"step": part(ratio), "fwd_bwd": part(0.8), "opt": part(ratio - 0.8)},
            "refresh": {"count_measured": 0}, "ratio_median": ratio, "ratio_mean": ratio,
            "ratio_from_parts": ratio, "ratio_decay_and_refresh_only": ratio,
            "env": {"threads": 1, "plain_optimizer": "torch.optim.AdamW"}}


def _cache_formats(preset: str | None = "sampled-256") -> dict:
    def trow(name: str, ppl: float, step: float) -> dict:
        return {"name": name, "format": "topk", "k": 64, "samples": None, "shared_cache": name == preset,
                "ppl": ppl, "ppl_dense": 20.0, "bytes_per_token": None if name == "online" else 388.0,
                "step_s": step, "steps_timed": 38, "tokens_trained": 20480, "wall_s": 100.0,
                "ppl_ratio": ppl / 100.0, "step_ratio": step / 10.0}
    static_rows = [{"name": "topk-64", "fmt": "topk", "k": 64, "samples": 0, "bytes_per_token": 388.0, "draws": 1,
                    "bias": 0.38, "single_draw": 0.38, "bias_batch": 0.2, "single_draw_batch": 0.2}]
    return {"static": {"stamp": STAMP, "command": "python bench/cache_formats.py --part static",
                       "model": "embedded:smollm2-135m", "blocks": 4, "seq_len": 128, "temperature": 2.0,
                       "seeds": 32, "vocab": 49152, "head_sampled": "top-32 + 64", "rows": static_rows},
            "train": {"stamp": STAMP, "command": "python bench/cache_formats.py --part train",
                      "params": "params/smollm2-quick.yaml", "method": "ast-naive", "steps": 40, "batch": 4,
                      "seq_len": 128, "tokens": 20480, "eval_windows": 8, "eval_seq_len": 512, "skip_steps": 2,
                      "rows": [trow("online", 100.0, 10.0), trow("topk-64", 101.0, 7.0),
                               trow("sampled-256", 103.5, 9.0)]}}


def _compression(ratio: float = 0.5625) -> dict:
    return {"stamp": STAMP, "command": "python bench/compression.py", "model": "embedded:smollm2-135m",
            "dtype": "float16", "pattern": "2:4", "masks": "one-shot magnitude", "slorb_group": 16,
            "sparse_linears": 210, "sparse_linear_params": 100, "slorb_params": 6, "slorb_bytes": 12,
            "sparse_linear_dense_bytes": 200, "sparse_linear_compressed_bytes": int(200 * ratio),
            "sparse_linear_ratio": ratio, "dense_model_bytes": 300, "checkpoint_compressed_bytes": 212,
            "checkpoint_dense_bytes_with_slorb": 312, "checkpoint_ratio_vs_dense_model": 212 / 300,
            "checkpoint_ratio_same_tensors": 212 / 312, "compressed_file_bytes": 220, "compressed_dir_bytes": 230,
            "hf_weights_file_bytes": 310, "hf_slorb_file_bytes": 20, "hf_dir_bytes": 400,
            "file_ratio_vs_hf_weights": 220 / 310}


def _gpu() -> dict:
    def k(o: int, i: int, tokens: int, speed: float, graph: float) -> dict:
        return {"out": o, "in": i, "tokens": tokens, "dense_ms": 1.0, "sparse_ms": 1 / speed, "speedup": speed,
                "dense_graph_ms": 1.0, "sparse_graph_ms": 1 / graph, "graph_speedup": graph, "rel_err": 1e-3}
    return {"device": "NVIDIA H200", "torch": "2.11", "cuda": "13.0", "backend": "cusparselt", "iters": 50,
            "kernels": [k(4096, 4096, 1, 0.04, 0.2), k(4096, 4096, 16384, 1.3, 1.4),
                        k(576, 576, 1, 0.02, 0.3), k(576, 576, 16384, 0.04, 0.75)],
            "end_to_end": {"model": "random LLaMA", "converted_layers": 210, "logit_diff": {"max_abs": 0.04},
                           "rows": [{"batch": 1, "seq_len": 128, "dense_ms": 26.0, "sparse_ms": 230.0, "speedup": 0.11,
                                     "dense_graph_ms": 3.5, "sparse_graph_ms": 5.8, "graph_speedup": 0.61}]}}


def _write_all(results: Path, *, overhead: float = 1.05) -> None:
    results.mkdir(parents=True)
    files = {"ladder": _ladder(), "sweep": _sweep(), "step_overhead": _step_overhead(overhead),
             "cache_formats": _cache_formats(), "compression": _compression(), "gpu_kernels": _gpu()}
    for name, data in files.items():
        (results / f"{name}.json").write_text(json.dumps(data))
    for png in ("ladder.png", "ladder_curve.png", "cache_formats.png"):
        (results / png).write_bytes(b"\x89PNG")


def _section(text: str, title_start: str) -> str:
    """The text of the ``## <title>`` section that starts with ``title_start``."""
    parts = text.split("\n## ")
    return next(p for p in parts if p.startswith(title_start))


def _verdict(section: str, goal_fragment: str) -> str:
    line = next(ln for ln in section.splitlines() if ln.startswith("- **Goal:") and goal_fragment in ln)
    return line.split(" — ")[1].split("**")[0]


# ----------------------------------------------------------------------------- report

@pytest.fixture()
def built(tmp_path: Path) -> tuple[str, Path]:
    results, out, notes = tmp_path / "bench" / "results", tmp_path / "docs" / "RESULTS.md", tmp_path / "notes"
    _write_all(results)
    notes.mkdir()
    (notes / "step_overhead.md").write_text("The refresh costs a full pass over the weights on 2 cores.\n")
    assert report.main(["--results", str(results), "--out", str(out), "--notes", str(notes)]) == 0
    return out.read_text(), tmp_path


def test_report_header_says_generated_and_not_to_edit(built: tuple[str, Path]) -> None:
    text, _ = built
    head = text[:800]
    assert "make bench-report" in head and "make bench" in head and "not edit" in head.lower()


def test_report_verdicts_follow_the_numbers(built: tuple[str, Path]) -> None:
    text, _ = built
    overhead = _section(text, "Overhead")
    assert _verdict(overhead, "plain masked fine-tuning") == "missed"  # 1.05 > 1.03
    assert "1.050" in overhead
    cache = _section(text, "Teacher cache")
    # step: topk-64 0.70 meets 0.80, the preset's sampled-256 0.90 does not -> missed, naming both
    step_line = next(ln for ln in cache.splitlines() if "online-teacher step" in ln)
    assert _verdict(cache, "online-teacher step") == "missed"
    assert "met by topk-64" in step_line and "missed by sampled-256" in step_line
    assert "judged on the preset's format, sampled-256" in step_line
    # ppl: topk-64 1.01 within 2%, the preset's 1.035 not
    assert _verdict(cache, "within 2%") == "missed"
    assert _verdict(_section(text, "Compression"), "fp16 dense") == "met"  # 0.5625 <= 0.57
    ladder = _section(text, "Method ladder")
    assert _verdict(ladder, "AST-Boosted < AST-Naive") == "missed"  # boosted 55 > naive-AST 50
    gpu = _section(text, "GPU kernels")
    assert _verdict(gpu, "LLaMA-7B") == "met" and _verdict(gpu, "SmolLM2") == "missed"
    glance = _section(text, "Goals at a glance")
    assert glance.count("**missed**") == 5 and glance.count("**met**") == 2


def test_report_sections_show_command_date_table_images_and_notes(built: tuple[str, Path]) -> None:
    text, _ = built
    ladder = _section(text, "Method ladder")
    assert "Command: `python bench/ladder.py --steps 100`" in ladder
    assert "2026-01-02 03:04 UTC" in ladder
    assert "51,200 tokens" in ladder  # the budget
    assert "| ast-naive | 50.00 | 50.0% |" in ladder
    assert "](../bench/results/ladder.png)" in ladder and "](../bench/results/ladder_curve.png)" in ladder
    assert "sweep.png" not in _section(text, "Decay sweep")  # not written: not linked
    sweep = _section(text, "Decay sweep")
    assert sweep.index("| 0.002 |") < sweep.index("| 0 |")  # best first
    assert "+0.0%" in sweep and "-42.0%" in sweep
    overhead = _section(text, "Overhead")
    assert "The refresh costs a full pass" in overhead  # the note, verbatim
    assert "python -m bench.step_overhead --steps 30" in overhead  # rebuilt from the file's settings
    assert "no stamp" in overhead  # the file carries no date: said, not invented
    cache = _section(text, "Teacher cache")
    assert "python bench/cache_formats.py --part static" in cache and "--part train" in cache
    assert "| topk-64 | 388 | 0.380 | 0.380 |" in cache
    assert "| sampled-256 | 103.50 | 1.0350 | 388 | 9.00 | 0.900 |" in cache
    assert "not written yet" in cache  # a missed goal without a note says the why is missing


def test_report_marks_missing_and_misshapen_files_not_measured(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "step_overhead.json").write_text(json.dumps(_step_overhead(1.01)))
    (results / "compression.json").write_text(json.dumps({"stamp": STAMP, "something": "else"}))
    (results / "sweep.json").write_text("{not json")
    text = report.build_report(results, tmp_path / "RESULTS.md", tmp_path / "no-notes")
    assert "Not measured yet (run: `python -m bench.ladder`)" in _section(text, "Method ladder")
    assert "Not measured yet (run: `python -m bench.cache_formats --part all`)" in _section(text, "Teacher cache")
    comp = _section(text, "Compression")
    assert "Not measured yet (run: `python -m bench.compression`)" in comp and "unexpected shape" in comp
    assert "could not be read" in _section(text, "Decay sweep")
    assert _verdict(_section(text, "Overhead"), "plain masked") == "met"  # 1.01 <= 1.03



def test_report_imports_no_torch_and_each_section_renderer_lives_with_its_benchmark() -> None:
    """report.py is the registry and the assembly: importing it pulls in no torch (the benchmark
    modules, several of which import torch, are imported only to render their section)."""
    import subprocess
    code = "import sys, bench.report; assert 'torch' not in sys.modules, 'bench.report imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    for sec in report.SECTIONS:
        assert callable(sec.bench_module().render_body), sec.module
        assert not hasattr(report, f"render_{sec.module}")


def test_report_as_a_module_renders_the_benchmarks_bodies(tmp_path: Path) -> None:
    """`python -m bench.report` runs this file as __main__ beside the bench.report the benchmarks import."""
    import subprocess
    results, out = tmp_path / "results", tmp_path / "docs" / "RESULTS.md"
    results.mkdir()
    (results / "ladder.json").write_text(json.dumps(_ladder()))
    subprocess.run([sys.executable, "-m", "bench.report", "--results", str(results), "--out", str(out),
                    "--notes", str(tmp_path / "notes")], cwd=REPO, check=True, capture_output=True)
    assert _verdict(_section(out.read_text(), "Method ladder"), "AST-Boosted < AST-Naive") == "missed"  # 55 > 50

@pytest.mark.parametrize("preset, expected", [("topk-64", "met"), ("sampled-256", "missed"), (None, "missed")])
def test_cache_goals_are_judged_on_the_presets_format(preset: str | None, expected: str) -> None:
    """topk-64 meets both goals and sampled-256 neither; without a preset row every format must meet them."""
    from bench.cache_formats import render_body
    body = render_body(_cache_formats(preset))
    assert [v.met for v in body.verdicts] == [expected == "met"] * 2
    assert all(("judged on the preset's format" in v.line()) == (preset is not None) for v in body.verdicts)


def test_cache_formats_markdown_with_only_one_part(tmp_path: Path) -> None:
    data = _cache_formats()
    del data["train"]
    from bench.cache_formats import render_markdown
    md = render_markdown(data, tmp_path)
    assert "| topk-64 | 388 |" in md
    assert "not measured yet (run: `python -m bench.cache_formats --part train`)" in md
    assert "— met**" not in md and "— missed**" not in md  # no training numbers, no verdict ...
    assert md.count("— not measured yet**") == 2  # ... but both goals are listed as open


# ----------------------------------------------------------------------------- cache formats

def test_cache_format_static_errors_on_a_tiny_model() -> None:
    from bench.cache_formats import FORMATS, real_logits, static_errors
    teacher, student = real_logits("tiny:llama", n_blocks=2, seq_len=8)
    assert teacher.shape == student.shape == (2, 8, teacher.shape[-1])
    assert not torch_equal(teacher, student)  # the 2:4 student differs from the dense teacher
    # A random tiny model's logits are almost flat (p ≈ uniform: no small cache can capture it and the
    # full-KL gradient is ~0); sharpen teacher and student alike so p is peaked like a trained model's.
    rows = {r["name"]: r for r in static_errors(30 * teacher, 30 * student, FORMATS, seeds=12)}
    for r in rows.values():
        k, s = r["k"], r["samples"]
        want = {"topk": 6 * k + 4, "sampled": 6 * s + 4, "head+sampled": 6 * k + 6 * s + 8}[r["fmt"]]
        assert r["bytes_per_token"] == want, r["name"]
    topk = [rows[f"topk-{k}"]["bias"] for k in (32, 64, 256)]
    assert 1 > topk[0] > topk[1] > topk[2] > 0
    assert all(rows[f"topk-{k}"]["bias"] == rows[f"topk-{k}"]["single_draw"] for k in (32, 64, 256))
    for name in ("sampled-64", "sampled-256", "head32+sampled64"):
        r = rows[name]
        assert r["draws"] == 12
        assert r["bias"] < r["single_draw"] / 2, name  # the error averages away: unbiased
        assert r["bias"] < 1.5 * r["noise_floor"], name  # ... at the 1/sqrt(draws) rate
    assert rows["sampled-256"]["single_draw"] < rows["sampled-64"]["single_draw"]


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    import torch
    return bool(torch.equal(a, b))


def test_cache_formats_train_plan_shares_only_the_base_cache() -> None:
    from bench.cache_formats import base_overrides, train_variants
    base = base_overrides(40, 4, 10)
    assert "train.method=ast-naive" in base and "train.t0_steps=10" in base
    assert "data.max_train_blocks=160" in base and "train.eval_every=0" in base
    assert not any(o.startswith("train.warmup_steps") for o in base)
    assert "train.warmup_steps=2" in base_overrides(2, 4, 10)  # a warm-up longer than the run is shortened
    quick = {v.name: v for v in train_variants(str(REPO / "params/smollm2-quick.yaml"), base)}
    assert quick["online"].overrides == ["teacher_cache.enabled=false"]
    assert [n for n, v in quick.items() if v.share_cache] == ["sampled-256"]  # the preset's cache
    assert "teacher_cache.format=head+sampled" in quick["head32+sampled64"].overrides
    tiny = train_variants(str(REPO / "params/tiny.yaml"), base_overrides(2, 4, 2))  # tiny caches topk k=16
    assert not any(v.share_cache for v in tiny)


def test_cache_formats_only_keeps_the_online_reference_and_refuses_unknown_names() -> None:
    from bench.cache_formats import base_overrides, select, train_variants
    every = train_variants(str(REPO / "params/smollm2-quick.yaml"), base_overrides(40, 4, 10))
    assert select(every, None) == every and select(every, []) == every
    assert [v.name for v in select(every, ["topk-64", "sampled-256"])] == ["online", "topk-64", "sampled-256"]
    with pytest.raises(ValueError, match="topk-7"):
        select(every, ["topk-7"])


def test_median_step_time_skips_the_first_steps() -> None:
    from bench.cache_formats import median_step_s
    hist = [{"step": 1, "tokens_per_s": 1.0}, {"step": 2, "tokens_per_s": 2.0}, {"step": 3, "tokens_per_s": 100.0},
            {"step": 4, "tokens_per_s": 50.0}, {"step": 5, "tokens_per_s": 100.0}, {"step": 5, "val_ppl": 9.0}]
    assert median_step_s(hist, 100) == pytest.approx(1.0)  # 100 tokens at 100 tokens/s, steps 1-2 left out
    assert median_step_s([], 100) is None


def test_cache_formats_outputs_from_synthetic_results(tmp_path: Path) -> None:
    from bench.cache_formats import write_outputs
    write_outputs(_cache_formats(), tmp_path)
    assert json.loads((tmp_path / "cache_formats.json").read_text())["train"]["steps"] == 40
    assert (tmp_path / "cache_formats.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "cache_formats.md").read_text()
    assert "![perplexity and bytes per token per cache format](cache_formats.png)" in md
    assert "| online | 100.00 | 1.0000 | — |" in md


# ----------------------------------------------------------------------------- compression

def test_compression_on_a_tiny_model(tmp_path: Path) -> None:
    from bench import compression
    assert compression.main(["--model", "tiny:llama", "--out-dir", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "compression.json").read_text())
    assert r["stamp"]["date"] and r["command"].startswith("python -m bench.compression")
    # every tiny linear has in_features % 4 == 0: exactly fp16 values for half + 2 bits each
    assert r["sparse_linear_ratio"] <= compression.PHYSICAL_LIMIT + 1e-9
    assert r["sparse_linear_compressed_bytes"] == r["sparse_linear_params"] // 2 * 2 + r["sparse_linear_params"] // 8
    assert r["slorb_params"] == r["sparse_linear_params"] // 16 and r["slorb_bytes"] == 2 * r["slorb_params"]
    # the whole checkpoint: compressed linears + dense rest (embeddings, norms, SLoRB) < the dense model
    rest = r["checkpoint_compressed_bytes"] - r["sparse_linear_compressed_bytes"]
    assert rest == r["dense_model_bytes"] - r["sparse_linear_dense_bytes"] + r["slorb_bytes"]
    assert r["checkpoint_ratio_vs_dense_model"] < 1.0
    assert r["hf_slorb_file_bytes"] > r["slorb_bytes"]  # SLoRB cannot fold into 2:4: a PEFT adapter holding X and S
    assert math.isclose(r["file_ratio_vs_hf_weights"], r["compressed_file_bytes"] / r["hf_weights_file_bytes"])
    md = (tmp_path / "compression.md").read_text()
    assert "**Goal: compressed 2:4 sparse linears ≤ 0.57× fp16 dense bytes" in md and "— met**" in md


def test_report_renders_what_the_ladder_and_sweep_scripts_write(tmp_path: Path) -> None:
    """The report reads the files bench/ladder.py and bench/decay_sweep.py build (their own pure builders)."""
    from bench import decay_sweep, ladder
    from tasks.config import load_config
    cfg = load_config(str(REPO / "params/tiny.yaml"))
    hist = [{"step": 0, "tokens": 0, "val_ppl": 900.0}, {"step": 10, "tokens": 2560, "tokens_per_s": 500.0,
                                                         "flip_rate_prev": 0.01, "pruned_kept_ratio": 0.3},
            {"step": 20, "tokens": 5120, "tokens_per_s": 500.0, "val_ppl": 700.0, "flip_rate_prev": 0.002,
             "pruned_kept_ratio": 0.25}]
    runs = {name: {"metrics": {"ppl_wikitext2": ppl, "ppl_wikitext2_dense": 500.0, "tokens_trained": 5120,
                               "method": name, "zero_shot": {"piqa": 0.55}, "flip_rate_final": 0.002},
                   "history": hist if name != "dense" else []}
            for name, ppl in (("dense", 500.0), ("oneshot-sparsegpt", 900.0), ("naive", 800.0),
                              ("ast-naive", 700.0), ("ast-boosted", 650.0))}
    results = tmp_path / "results"
    results.mkdir()
    lad = ladder.build_report(runs, cfg=cfg, params="params/tiny.yaml", command="python bench/ladder.py",
                              stamp_=STAMP)
    (results / "ladder.json").write_text(json.dumps(lad))
    rows = [decay_sweep.sweep_row(v.name, meta, {"ppl_wikitext2": 800.0 - 100 * i}, hist, 20)
            for i, (v, meta) in enumerate(decay_sweep.plan(20, [1e-3], [0.25]))]
    sw = decay_sweep.build_report(rows, cfg=cfg, params="params/tiny.yaml", command="python bench/decay_sweep.py",
                                  stamp_=STAMP)
    (results / "sweep.json").write_text(json.dumps(sw))
    text = report.build_report(results, tmp_path / "RESULTS.md", tmp_path / "notes")
    ladder_sec, sweep_sec = _section(text, "Method ladder"), _section(text, "Decay sweep")
    assert "unexpected shape" not in text
    assert _verdict(ladder_sec, "AST-Boosted < AST-Naive") == "met"  # 650 < 700 < 800 < 900
    assert "| ast-boosted | 650.00 | 62.5% |" in ladder_sec
    assert "| 0.001 | 5 (25%) | 700.00 | -12.5% |" in sweep_sec  # best first, vs λ = 0
    assert "Best: λ_max = 0.001" in sweep_sec
