"""The training benchmarks (``bench/ladder.py``, ``bench/decay_sweep.py``).

End to end on the tiny preset with a few steps (the real stages, the real
runner), then the table and gap arithmetic on synthetic rows, where the right
answer is known in advance.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import decay_sweep, ladder, plotting  # noqa: E402
from tasks.config import load_config  # noqa: E402

TINY = str(REPO / "params" / "tiny.yaml")
QUICK = ["--params", TINY, "--steps", "4", "--set", "evaluate.max_windows=1", "--set", "evaluate.seq_len=64",
         "--set", "evaluate.zero_shot.enabled=false", "--set", "train.refresh_every=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread: on a shared 2-core box two OpenMP threads per process make tiny ops far slower
    (``configure_threads`` leaves the count alone when OMP_NUM_THREADS is set)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_png(path: Path) -> None:
    """A PNG that decodes to a non-empty RGB(A) image, not just a file with the right name."""
    import matplotlib.image as mpimg
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)


def history(work: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (work / name / "train" / "history.jsonl").read_text().splitlines()]


def assert_curve(points: list[list[float]], tokens: int) -> None:
    xs = [p[0] for p in points]
    assert xs[0] == 0 and xs[-1] == tokens
    assert all(a < b for a, b in zip(xs, xs[1:])), xs
    assert all(math.isfinite(p[1]) and p[1] > 1 for p in points)


# ----------------------------------------------------------------------------- end to end (tiny preset)

def test_ladder_end_to_end_on_tiny(tmp_path: Path, one_thread: None, capsys: pytest.CaptureFixture) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [*QUICK, "--out-dir", str(out), "--work", str(work), "--only", "dense", "oneshot-sparsegpt", "ast-ste"]
    assert ladder.main(argv) == 0
    captured = capsys.readouterr()
    assert "[3/3] ast-ste" in captured.out  # one line per variant
    assert "train: 100%" in captured.err  # and a bar inside each: a benchmark job can train for most of an hour

    report = json.loads((out / "ladder.json").read_text())
    assert {"date", "commit", "machine"} <= set(report["stamp"])
    assert report["budget"] == {"steps": 4, "batch": 4, "seq_len": 64, "tokens": 4 * 4 * 64}
    assert report["evaluation"]["wikitext2_windows"] == 1 and report["evaluation"]["seq_len"] == 64
    assert report["evaluation"]["zero_shot"]["enabled"] is False

    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "oneshot-sparsegpt", "ast-ste"]  # ladder order, only the chosen rungs
    for r in rows.values():
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    dense, sgpt = rows["dense"]["ppl"], rows["oneshot-sparsegpt"]["ppl"]
    for r in rows.values():
        assert r["gap_closed"] == pytest.approx((sgpt - r["ppl"]) / (sgpt - dense))
    assert rows["dense"]["tokens"] == 0 and rows["ast-ste"]["tokens"] == 1024
    assert rows["dense"]["train_s"] is None and rows["ast-ste"]["train_s"] > 0
    assert rows["dense"]["flip_rate_final"] is None and 0 <= rows["ast-ste"]["flip_rate_final"] < 1

    # ast-ste is AST with the decay off: λ stays 0 while the mask is refreshed (steps 2 and 4)
    hist = history(work, "ast-ste")
    assert [h["lam"] for h in hist if "lam" in h] == [0.0] * 4
    # a finished variant keeps its final model but not its resume checkpoints
    assert (work / "ast-ste" / "train" / "final" / "model.safetensors").is_file()
    assert not (work / "ast-ste" / "train" / "checkpoints").exists()
    assert [h["step"] for h in hist if "flip_rate_prev" in h] == [2, 4]

    assert list(report["curves"]) == ["ast-ste"]
    assert_curve(report["curves"]["ast-ste"], 1024)
    assert len(report["curves"]["ast-ste"]) == 5  # step 0 + every step (eval_every = steps // 4 = 1)

    md = (out / "ladder.md").read_text()
    assert "| method | WikiText-2 ppl | gap closed vs SparseGPT |" in md
    for name, r in rows.items():
        assert f"| {name} | {r['ppl']:.2f} |" in md
    assert "4 steps × 4×64 tokens = 1,024 tokens" in md and "python -m bench.ladder" in md
    for png in ("ladder.png", "ladder_curve.png"):
        assert_png(out / png)

    # resumable: a second run finds every stage done and reports the same numbers
    done = (work / "ast-ste" / "train" / "done.json").stat().st_mtime_ns
    assert ladder.main(argv) == 0
    assert (work / "ast-ste" / "train" / "done.json").stat().st_mtime_ns == done
    again = json.loads((out / "ladder.json").read_text())
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in report["rows"]]


def test_decay_sweep_end_to_end_on_tiny(tmp_path: Path, one_thread: None) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    lambdas, fracs = [1e-3, 1e-2], [0.25]
    argv = [*QUICK, "--lambdas", *map(str, lambdas), "--t0-fracs", *map(str, fracs),
            "--out-dir", str(out), "--work", str(work)]
    assert decay_sweep.main(argv) == 0

    report = json.loads((out / "sweep.json").read_text())
    assert report["method"] == "ast-naive" and report["budget"]["tokens"] == 1024
    assert {"date", "commit", "machine"} <= set(report["stamp"])
    rows = report["rows"]
    assert len(rows) == 1 + len(lambdas) * len(fracs)
    assert (rows[0]["lambda_max"], rows[0]["t0"]) == (0.0, None)
    assert sorted((r["lambda_max"], r["t0"]) for r in rows[1:]) == [(lam, 1) for lam in lambdas]

    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        assert [s for s, _ in r["flips"]] == [2, 4] and all(0 <= f <= 1 for _, f in r["flips"])
        assert [s for s, _ in r["ratio"]] == [2, 4] and all(0 < v < 2 for _, v in r["ratio"])
        assert r["flip_rate_final"] == pytest.approx(r["flips"][-1][1])
        assert_curve(r["curve"], 1024)
        lams = [h["lam"] for h in history(work, r["name"]) if "lam" in h]
        assert max(lams) == pytest.approx(r["lambda_max"])  # the variant really trained with its λ_max
    # the decay pulls masked weights towards 0: the strongest λ ends with the lowest pruned/kept ratio
    final_ratio = {r["lambda_max"]: r["ratio"][-1][1] for r in rows}
    assert final_ratio[1e-2] < final_ratio[0.0]

    assert report["best"]["ppl"] == min(r["ppl"] for r in rows)
    md = (out / "sweep.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith(("| λ_max", "| ---"))]
    assert [float(line.split("|")[3]) for line in table] == sorted(round(r["ppl"], 2) for r in rows)
    assert "Best:" in md and "λ_max × steps" in md and "python -m bench.decay_sweep" in md
    for png in ("sweep.png", "sweep_flips.png", "sweep_ratio.png"):
        assert_png(out / png)


@pytest.mark.parametrize("script, extra", [(ladder, ["--set", "train.steps=abc"]),
                                           (ladder, ["--set", "train.lr=-1"]),
                                           (decay_sweep, ["--set", "evaluate.nope=1"]),
                                           (decay_sweep, ["--lambdas", "-0.001"])])
def test_bad_settings_exit_2_with_one_line(script, extra: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    assert script.main(["--params", TINY, *extra, "--out-dir", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "work" / "shared" / "prepare").exists()  # validated before any work


# ----------------------------------------------------------------------------- tables on synthetic rows

def _metrics(method: str, ppl: float, zero_shot: dict | None = None, tokens: int = 0, flip: float = 0.0) -> dict:
    return {"method": method, "ppl_wikitext2": ppl, "ppl_wikitext2_dense": 20.0, "ppl_windows": 8,
            "zero_shot": zero_shot or {}, "tokens_trained": tokens, "flip_rate_final": flip}


def _train_history(steps: int, step_tokens: int, tok_per_s: float, every: int = 1) -> list[dict]:
    hist = [{"step": 0, "tokens": 0, "val_ppl": 90.0}]
    hist += [{"step": s, "tokens": s * step_tokens, "tokens_per_s": tok_per_s, "loss": 1.0,
              **({"val_ppl": 90.0 - s} if s % 2 == 0 else {})} for s in range(every, steps + 1, every)]
    return hist


def test_ladder_rows_gap_and_table_from_synthetic_runs(tmp_path: Path) -> None:
    runs = {
        "dense": {"metrics": _metrics("dense", 20.0, {"piqa": 0.70, "rte": 0.60})},
        "oneshot-sparsegpt": {"metrics": _metrics("oneshot-sparsegpt", 60.0, {"piqa": 0.60, "rte": 0.50})},
        "naive": {"metrics": _metrics("naive", 40.0, {"piqa": 0.64, "rte": 0.52}, 2048),
                  "history": _train_history(4, 512, 256.0)},
        "ast-boosted": {"metrics": _metrics("ast-boosted", 30.0, {"piqa": 0.66, "rte": 0.58}, 2048, 0.0005),
                        "history": _train_history(4, 512, 128.0, every=2)},
    }
    rows = {r["method"]: r for r in ladder.ladder_rows(runs, steps=4)}
    assert [rows[m]["gap_closed"] for m in runs] == pytest.approx([1.0, 0.0, 0.5, 0.75])
    assert rows["naive"]["zero_shot_mean"] == pytest.approx(0.58)
    assert rows["naive"]["train_s"] == pytest.approx(4 * 512 / 256.0)
    assert rows["ast-boosted"]["train_s"] == pytest.approx(4 * 512 / 128.0)  # logged every 2 steps, scaled
    assert rows["naive"]["flip_rate_final"] is None  # fixed mask: no refresh, no flip rate claimed
    assert rows["ast-boosted"]["flip_rate_final"] == 0.0005

    table = ladder.ladder_table(list(rows.values()))
    header = "| method | WikiText-2 ppl | gap closed vs SparseGPT | piqa acc | rte acc | zero-shot mean |"
    assert table.splitlines()[0].startswith(header)
    assert "| naive | 40.00 | 50.0% | 0.640 | 0.520 | 0.580 | 2,048 | 8 | — |" in table
    assert "| ast-boosted | 30.00 | 75.0% |" in table and "| 0.050% |" in table

    # without a dense run the dense reference is the one every run measured; without SparseGPT no gap at all
    no_dense = {k: v for k, v in runs.items() if k != "dense"}
    assert ladder.ladder_rows(no_dense, 4)[2]["gap_closed"] == pytest.approx(0.75)
    no_sgpt = {k: v for k, v in runs.items() if k != "oneshot-sparsegpt"}
    assert all(r["gap_closed"] is None for r in ladder.ladder_rows(no_sgpt, 4))
    assert "| naive | 40.00 | — |" in ladder.ladder_table(ladder.ladder_rows(no_sgpt, 4))

    cfg = load_config(TINY, ["train.steps=4"])
    report = ladder.build_report(runs, cfg=cfg, params="params/tiny.yaml", command="python bench/ladder.py",
                                 stamp_={"date": "today", "commit": "abc", "machine": "test"})
    assert report["curves"]["naive"] == [[0, 90.0], [1024, 88.0], [2048, 86.0]]
    assert set(report["curves"]) == {"naive", "ast-boosted"}
    written = ladder.write_outputs(report, tmp_path)
    assert "| naive | 40.00 | 50.0% |" in (tmp_path / "ladder.md").read_text()
    for p in written:
        assert p.exists()
    assert_png(tmp_path / "ladder.png")
    assert_png(tmp_path / "ladder_curve.png")


def test_sweep_plan_rows_and_table_from_synthetic_runs(tmp_path: Path) -> None:
    names = [(v.name, meta["lambda_max"], meta["t0"]) for v, meta in
             decay_sweep.plan(40, [1e-4, 5e-4, 2e-3, 1e-2], [0.25, 0.5])]
    assert len(names) == 9 and names[0] == ("lambda0", 0.0, None)
    assert sorted(n[1:] for n in names[1:]) == sorted((lam, t0) for lam in (1e-4, 5e-4, 2e-3, 1e-2)
                                                      for t0 in (10, 20))
    assert len({n[0] for n in names}) == 9
    plan = decay_sweep.plan(4, [0.0, 1e-3, 1e-3], [0.5, 0.6])  # λ=0 is the reference; T0 2 twice -> once
    assert [(m["lambda_max"], m["t0"]) for _, m in plan] == [(0.0, None), (1e-3, 2)]
    assert plan[1][0].overrides == ["train.lambda_max=0.001", "train.t0_steps=2"]

    def hist(ratios: list[float], flips: list[float]) -> list[dict]:
        h = _train_history(4, 512, 256.0)
        for rec, ratio, flip in zip([h[2], h[4]], ratios, flips):
            rec.update(pruned_kept_ratio=ratio, flip_rate_prev=flip, flip_rate_init=flip)
        return h

    specs = [("lambda0", 0.0, None, None, 50.0, [0.34, 0.34], [0.006, 0.006]),
             ("lam0.002_t0-1", 2e-3, 1, 0.25, 40.0, [0.34, 0.27], [0.006, 0.0]),
             ("lam0.01_t0-1", 1e-2, 1, 0.25, 45.0, [0.34, 0.10], [0.006, 0.0001]),
             ("lam0.01_t0-2", 1e-2, 2, 0.5, 44.0, [0.34, 0.12], [0.006, 0.0002])]
    rows = [decay_sweep.sweep_row(name, {"lambda_max": lam, "t0": t0, "t0_frac": frac},
                                  _metrics("ast-naive", ppl, tokens=2048, flip=flips[-1]), hist(ratios, flips), 4)
            for name, lam, t0, frac, ppl, ratios, flips in specs]
    assert rows[1]["flips"] == [[2, 0.006], [4, 0.0]] and rows[2]["ratio"] == [[2, 0.34], [4, 0.10]]
    assert rows[0]["curve"] == [[0, 90.0], [1024, 88.0], [2048, 86.0]]

    table = decay_sweep.sweep_table(rows).splitlines()
    assert [line.split("|")[3].strip() for line in table[2:]] == ["40.00", "44.00", "45.00", "50.00"]
    assert table[2].startswith("| 0.002 | 1 (25%) | 40.00 | -20.0% | 0.000% | 0.600% → 0.000% | 0.340 → 0.270 |")

    cfg = load_config(TINY, ["train.steps=4", "train.method=ast-naive"])
    report = decay_sweep.build_report(rows, cfg=cfg, params="params/tiny.yaml", command="c",
                                      stamp_={"date": "today"})
    assert report["best"]["name"] == "lam0.002_t0-1"
    assert report["scaling"]["lambda_steps"] == pytest.approx(2e-3 * 4)
    best = "Best: λ_max = 0.002, T0 = 1 steps (25% of 4), ppl 40.00 vs 50.00 at λ = 0."
    assert best == decay_sweep.best_line(report)
    assert "0.002 × 4 = 0.008" in decay_sweep.scaling_line(report)
    decay_sweep.write_outputs(report, tmp_path)
    for png in ("sweep.png", "sweep_flips.png", "sweep_ratio.png"):
        assert_png(tmp_path / png)  # zero flip rates on the log axis are dropped, not an error
    only_ref = decay_sweep.build_report(rows[:1], cfg=cfg, params="p", command="c", stamp_={})
    assert "no decay setting beat it" in decay_sweep.best_line(only_ref)


def test_plotting_save_is_atomic_and_handles_empty_series(tmp_path: Path) -> None:
    path = plotting.line_plot(tmp_path / "sub" / "empty.png", {"a": ([], []), "b": ([1, 2], [0.0, -1.0])},
                              title="t", xlabel="x", ylabel="y", logy=True)
    assert_png(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["empty.png"]  # no temporary file left behind
    assert_png(plotting.bar_plot(tmp_path / "bars.png", ["a", "b"], [3.0, None], title="t", ylabel="y", logy=True))

    def width(png: Path) -> int:  # from the PNG header (IHDR)
        return int.from_bytes(png.read_bytes()[16:20], "big")

    few = plotting.line_plot(tmp_path / "few.png", {"a": ([1, 2], [3.0, 2.0])}, title="t", xlabel="x", ylabel="y")
    many = plotting.line_plot(tmp_path / "many.png", {str(i): ([1, 2], [3.0 + i, 2.0]) for i in range(8)},
                              title="t", xlabel="x", ylabel="y")
    assert (width(few), width(many)) == (700, 1000)  # a long legend gets its own room beside the axes


def test_budget_config_sets_the_budget_and_lets_the_user_override_the_bench() -> None:
    base, cfg = ladder.budget_config(TINY, 6, ["train.t0_steps=1", "train.method=ast-naive"],
                                     ["train.t0_steps=3", "train.batch_size=2"])
    assert cfg.train.steps == 6 and cfg.train.t0_steps == 3 and cfg.train.method == "ast-naive"
    assert cfg.data.max_train_blocks == 6 * 2 * cfg.train.grad_accum  # from the user's batch size, one epoch
    assert base.index("train.t0_steps=1") < base.index("train.t0_steps=3")
    with pytest.raises(ladder.ConfigError, match="train.lr"):
        ladder.budget_config(TINY, 6, [], ["train.lr=-1"])


def test_slorb_init_bench_end_to_end_on_tiny(tmp_path: Path, one_thread: None) -> None:
    from bench import slorb_init
    out, work = tmp_path / "out", tmp_path / "work"
    assert slorb_init.main([*QUICK, "--out-dir", str(out), "--work", str(work)]) == 0
    data = json.loads((out / "slorb_init.json").read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["no-slorb", "mean", "lstsq"]
    assert [r["method"] for r in rows.values()] == ["ast-naive", "ast-boosted", "ast-boosted"]
    for name, r in rows.items():
        assert_curve(r["curve"], 4 * 4 * 64)
        assert r["val_ppl_start"] == history(work, name)[0]["val_ppl"]  # step 0, before any training
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    # The same initial mask everywhere: the runs differ at step 0 only by their SLoRB branch, and
    # each init really reached the model (three different starting points).
    assert len({r["val_ppl_start"] for r in rows.values()}) == 3
    assert_png(out / "slorb_init.png")
    md = (out / "slorb_init.md").read_text()
    assert "| AST-Boosted, least-squares init |" in md and "python -m bench.slorb_init" in md
    body = slorb_init.render_body(data, lambda name, alt: f"![{alt}]({name})\n")
    assert "slorb_init.png" in body.text and body.verdicts == []
