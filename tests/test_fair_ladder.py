"""The fair ladder (bench/fair_ladder.py): rungs, plan, choice of the best AST setting, verdicts, a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import fair_ladder as fl
from tasks.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "params" / "tiny.yaml")


def test_rungs_differ_only_in_what_they_claim_to() -> None:
    base = fl.base_overrides(40, 1, 128, 256, 64, batch=4)
    cfgs = {r: load_config(TINY, [*base, *fl.rung_overrides(r, 40)]) for r in fl.RUNGS}
    fixed, paper = cfgs["fixed-kd"].train, cfgs["ast-paper"].train
    assert fixed.spec.distils and not fixed.spec.adaptive and paper.spec.adaptive
    assert (fixed.lr, fixed.kd_alpha, fixed.steps, cfgs["fixed-kd"].seed) == (paper.lr, paper.kd_alpha, 40, 1)
    # the paper's λ_max = 1e-4 over 40k steps, kept as λ·steps at 40 steps; T0 = 25 %; v tracks u²
    assert paper.lambda_max == pytest.approx(0.1) and paper.t0 == 10 and paper.second_moment == "update"
    assert paper.refresh_score == "magnitude" and cfgs["ast-official"].train.refresh_score == "wanda"
    u2 = cfgs["fixed-kd-u2"].train  # the control of the u² rungs differs from fixed-kd in that form only
    assert u2.second_moment == "update" and not u2.spec.adaptive and fl.control_of("ast-official") == "fixed-kd-u2"
    assert fl.control_of("ast-default") == "fixed-kd" and fl.control_of("fixed-kd-u2") == "fixed-kd"
    assert fl.control_of("ast-default-u2") == "fixed-kd-u2"
    # ast-default is the preset's AST (its λ, refresh and the library's second moment); -u2 differs in the form
    preset = load_config(TINY, base).train
    for rung, form in (("ast-default", preset.second_moment), ("ast-default-u2", "update")):
        mine = cfgs[rung].train
        assert (mine.second_moment, mine.lambda_max, mine.refresh_score) == (form, preset.lambda_max,
                                                                             preset.refresh_score)
    # fixed-kd-slorb is ast-boosted-lstsq with a fixed mask: the two resolved configs differ in the method alone
    slorb, boosted = (cfgs[r].model_dump() for r in ("fixed-kd-slorb", "ast-boosted-lstsq"))
    assert slorb["train"].pop("method") == "fixed-kd-slorb" and boosted["train"].pop("method") == "ast-boosted"
    assert slorb == boosted and not cfgs["fixed-kd-slorb"].train.spec.adaptive and cfgs["fixed-kd-slorb"].train.spec.slorb
    assert fl.control_of("ast-boosted-lstsq") == "fixed-kd-slorb"
    assert fl.control_of("ast-boosted-lstsq-u2") == "fixed-kd-slorb-u2" and fl.control_of("fixed-kd-slorb-u2") is None
    for rung in ("fixed-kd-slorb", "ast-boosted-lstsq"):  # the u² twin differs in the second moment alone
        a, b = cfgs[rung].model_dump(), cfgs[rung + "-u2"].model_dump()
        assert (a["train"].pop("second_moment"), b["train"].pop("second_moment")) == ("gradient", "update") and a == b
    assert fl.control_of("ast-boosted-mean") is None and fl.control_of("fixed-kd-slorb") is None
    assert {c.data.calib_blocks for c in cfgs.values()} == {256}  # one calibration for every rung
    assert cfgs["oneshot-sparsegpt"].evaluate.max_windows == 128
    with pytest.raises(Exception, match="unknown rung"):
        fl.rung_overrides("nope", 40)


def test_plan_puts_the_decisive_rungs_first_and_takes_the_best_ast_to_larger_budgets() -> None:
    jobs = fl.plan([0, 1, 2], [40, 160], best="ast-official")
    first = [(j.steps, j.seed, j.rung) for j in jobs[:15]]
    assert first[:5] == [(40, 0, "fixed-kd"), (40, 0, "ast-paper"), (40, 0, "ast-default"), (40, 0, "fixed-kd-u2"),
                         (40, 0, "ast-official")]
    assert {(j.seed, j.rung) for j in jobs if j.steps == 40 and j.rung == "fixed-kd"} == {(0, "fixed-kd"),
                                                                                         (1, "fixed-kd"),
                                                                                         (2, "fixed-kd")}
    big = [j.rung for j in jobs if j.steps == 160]  # each AST rung with the control of its optimizer form
    assert big == ["fixed-kd-u2", "ast-paper", "ast-official"] and len({j.key for j in jobs}) == len(jobs)
    assert [j.rung for j in fl.plan([0], [40, 160], best="ast-default") if j.steps == 160] == [
        "fixed-kd-u2", "ast-paper", "fixed-kd", "ast-default"]
    assert fl.parse_job("s160-seed2-fixed-kd-u2") == fl.Job(160, 2, "fixed-kd-u2")
    with pytest.raises(Exception, match="sSTEPS-seedN-RUNG"):
        fl.parse_job("s40-seed0-nope")


def _job(rung: str, seed: int, ppl: float, val: float, nll: list[float], steps: int = 40) -> dict:
    hist = [{"step": 0, "tokens": 0, "val_ppl": 300.0},
            {"step": steps, "tokens": steps * 512, "loss": 1.0, "tokens_per_s": 100.0, "val_ppl": val,
             "flip_rate_prev": 0.01, "flip_rate_init": 0.02}]
    return {"job": {"steps": steps, "seed": seed, "rung": rung}, "started": "t", "commit_at_start": "c",
            "config": {}, "wall_s": 1.0, "history": hist if rung.startswith("ast") else hist[:1] + [
                {k: v for k, v in hist[1].items() if not k.startswith("flip")}],
            "metrics": {"ppl_wikitext2": ppl, "ppl_wikitext2_dense": 36.0, "ppl_window_nll": nll,
                        "ppl_wikitext2_ci95": [ppl * 0.9, ppl * 1.1], "ppl_windows": len(nll),
                        "tokens_trained": steps * 512}}


def test_best_setting_is_chosen_on_validation_and_verdicts_need_every_seed() -> None:
    base = [4.0, 4.2, 3.9, 4.1, 4.05, 3.95]
    results = [
        _job("fixed-kd", 0, 100.0, 90.0, base), _job("fixed-kd", 1, 101.0, 91.0, base),
        # lower test ppl but higher validation ppl: must not be chosen
        _job("ast-paper", 0, 95.0, 99.0, [x - 0.05 for x in base]),
        _job("ast-paper", 1, 96.0, 99.0, [x - 0.05 for x in base]),
        _job("ast-default", 0, 100.0, 80.0, [x + (0.01 if i % 2 else -0.01) for i, x in enumerate(base)]),
        _job("ast-default", 1, 100.0, 80.0, [x - 0.05 for x in base]),
        _job("dense", 0, 30.0, 30.0, [x - 1.0 for x in base]),
    ]
    assert fl.best_ast(results, 40) == "ast-default"
    # a setting run on seed 0 only is compared on seed 0: its 85 beats ast-default's 80 + 90 mean of 85 only there
    uneven = [_job("ast-default", 0, 100.0, 80.0, base), _job("ast-default", 1, 100.0, 90.0, base),
              _job("ast-official", 0, 100.0, 84.0, base)]
    assert fl.best_ast(uneven, 40) == "ast-default"
    rows = fl.summarize(results)
    by = {r["rung"]: r for r in rows}
    assert by["ast-paper"]["ppl_mean"] == pytest.approx(95.5) and by["ast-paper"]["ppl_sd"] == pytest.approx(0.7071,
                                                                                                             rel=1e-3)
    assert by["ast-paper"]["mask_change_vs_init"] == [0.02, 0.02] and by["fixed-kd"]["mask_change_vs_init"] is None
    text = "\n".join(fl.verdicts(rows))
    assert "ast-paper: better than fixed-kd" in text  # both seeds' paired intervals below 1
    assert "ast-default: no measurable difference from fixed-kd" in text  # one seed straddles 1
    assert by["ast-paper"]["control"] == "fixed-kd"  # its own control (fixed-kd-u2) has not run: said so
    assert by["dense"]["ratio_to_control"] == []  # a reference, not a rung with a fixed-mask control
    # gap closed against the one-shot reference's mean over its seeds (dense 36): (120 - 100) / (120 - 36)
    sgpt = [_job(fl.ONE_SHOT_BEST, 0, 110.0, 110.0, base), _job(fl.ONE_SHOT_BEST, 1, 130.0, 130.0, base)]
    gaps = {r["rung"]: r["gap_closed"] for r in fl.summarize(results + sgpt)}
    assert gaps["fixed-kd"] == pytest.approx((120.0 - 100.5) / (120.0 - 36.0))
    assert gaps[fl.ONE_SHOT_BEST] == pytest.approx(0.0)


def test_ingredients_are_paired_on_the_seeds_both_rungs_ran() -> None:
    base = [4.0, 4.2, 3.9, 4.1, 4.05, 3.95]
    results = [_job("fixed-kd", s, 100.0, 90.0, base) for s in (0, 1, 2)] + [
        _job("naive", 0, 105.0, 95.0, [x + 0.05 for x in base]), _job("naive", 1, 105.0, 95.0, [x + 0.05 for x in base]),
        _job("ast-default", 0, 100.0, 90.0, base),
        # SLoRB better on one window set, worse on the other: no measurable difference
        _job("ast-boosted-lstsq", 0, 100.0, 90.0, [x + (0.02 if i % 2 else -0.02) for i, x in enumerate(base)]),
        _job("ast-boosted-mean", 1, 100.0, 90.0, base)]  # its ast-default (seed 1) has not run: no row
    rows = {r["ingredient"]: r for r in fl.ingredient_rows(results)}
    assert set(rows) == {"distillation (KD)", "SLoRB on the adaptive mask, least-squares init"}
    kd = rows["distillation (KD)"]
    assert kd["seeds"] == [0, 1] and kd["verdict"] == "better" and kd["tokens"] == 40 * 512
    assert kd["ratio"][0][0] == pytest.approx(2.718281828 ** -0.05)  # exp of the mean NLL difference
    assert rows["SLoRB on the adaptive mask, least-squares init"]["verdict"] == "no measurable difference"
    text = fl.ingredient_table(list(rows.values()))
    assert "fixed-kd / naive" in text and "0,1" in text


def test_a_small_ladder_runs_resumes_and_reports(tmp_path: Path) -> None:
    """Three jobs on the tiny preset, then a re-run that runs nothing new and rebuilds the report."""
    args = ["--params", TINY, "--steps", "2", "--seeds", "0", "--windows", "2", "--calib-blocks", "4",
            "--val-blocks", "4", "--work", str(tmp_path / "w"), "--out-dir", str(tmp_path / "out")]
    assert fl.main([*args, "--max-jobs", "3"]) == 0
    jobs = sorted(p.name for p in (tmp_path / "w" / "jobs").iterdir())
    assert jobs == ["s2-seed0-ast-default.json", "s2-seed0-ast-paper.json", "s2-seed0-fixed-kd.json"]
    rec = json.loads((tmp_path / "w" / "jobs" / "s2-seed0-ast-paper.json").read_text())
    assert rec["commit_at_start"] and rec["config"]["train"]["refresh_score"] == "magnitude"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "jobs").iterdir()}
    assert fl.main([*args, "--report-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "w" / "jobs").iterdir()} == before
    report = json.loads((tmp_path / "out" / "fair_ladder.json").read_text())
    assert report["done"] == 3 and {r["rung"] for r in report["rows"]} == {"fixed-kd", "ast-paper", "ast-default"}
    assert "--report-only" not in report["command"]
    md = (tmp_path / "out" / "fair_ladder.md").read_text()
    assert "| 1,024 | fixed-kd | 0 |" in md or "fixed-kd" in md


@pytest.mark.parametrize("record", sorted((REPO / "bench" / "results" / "fair_ladder_jobs").glob("*.json")),
                         ids=lambda p: p.stem)
def test_the_recorded_jobs_are_what_this_commit_would_run(record: Path) -> None:
    """Every finished job kept in the repo ran with the full config this commit resolves for its key, so the
    report may pool jobs from several commits, and a later preset change (smollm2-quick's second moment) does
    not silently change what a rung means."""
    rec = json.loads(record.read_text())
    job = fl.parse_job(record.stem)
    assert rec["job"] == job.record()
    args = fl.parse_args(["--windows", str(rec["config"]["evaluate"]["max_windows"])])
    _, cfg = fl.job_config(str(REPO / "params" / "smollm2-quick.yaml"), job, args)
    now = cfg.model_dump(mode="json")
    # the one key added since the first jobs: how many windows the trained model is checked against its export
    # on (it was every window); the reported perplexity is the export's on all windows either way
    if "check_windows" not in rec["config"]["evaluate"]:
        assert now["evaluate"].pop("check_windows") == 8
    if job.rung in fl.ONE_SHOT:  # no training step: the optimizer's form is inert (the preset's default moved)
        now["train"]["second_moment"] = rec["config"]["train"]["second_moment"]
    assert now == rec["config"]


def test_headline_evaluations_follow_their_training_and_are_planned_after_the_larger_budgets() -> None:
    jobs = fl.plan([0, 1], [40, 160], best="ast-official", headline=True)
    ev = [j for j in jobs if j.kind == "eval"]
    assert [j.rung for j in ev] == list(fl.EVAL_RUNGS) and {(j.steps, j.seed) for j in ev} == {(40, 0)}
    assert max(i for i, j in enumerate(jobs) if j.steps == 160) < jobs.index(ev[0])
    assert fl.parse_job("eval-s40-seed0-ast-paper") == fl.Job(40, 0, "ast-paper", "eval")
    assert fl.Job(40, 0, "ast-paper", "eval").trained.key == "s40-seed0-ast-paper"
    assert not [j for j in fl.plan([0], [40], best=None) if j.kind == "eval"]


def test_a_small_ladder_gives_headline_rows_paired_per_window_and_item_and_refuses_a_foreign_export(
        tmp_path: Path) -> None:
    from bench import ladder_eval
    from tasks.common import StageError

    args = ["--params", TINY, "--steps", "2", "--seeds", "0", "--windows", "2", "--calib-blocks", "4",
            "--val-blocks", "4", "--work", str(tmp_path / "w"), "--out-dir", str(tmp_path / "out"),
            "--headline-windows", "5", "--zero-shot-limit", "6", "--zero-shot-tasks", "piqa", "winogrande",
            "--jobs", "eval-s2-seed0-fixed-kd", "s2-seed0-fixed-kd", "s2-seed0-ast-default", "eval-s2-seed0-fixed-kd",
            "eval-s2-seed0-ast-default"]
    assert fl.main(args) == 0
    rec = json.loads((tmp_path / "w" / "eval" / "eval-s2-seed0-ast-default.json").read_text())
    train = json.loads((tmp_path / "w" / "jobs" / "s2-seed0-ast-default.json").read_text())
    assert rec["ppl_windows"] == 5 and rec["window_nll"][:2] == pytest.approx(train["metrics"]["ppl_window_nll"],
                                                                             abs=1e-4)
    assert rec["docs"] == {"piqa": 6, "winogrande": 6} and rec["commit_at_start"]
    assert all(len(rec["items"][t]) == 6 and sum(rec["items"][t]) / 6 == pytest.approx(rec["acc"][t])
               for t in ("piqa", "winogrande"))
    report = json.loads((tmp_path / "out" / "fair_ladder.json").read_text())
    row = {r["rung"]: r for r in report["headline_rows"]}["ast-default"]
    assert row["control"] == "fixed-kd" and row["items"] == 12 and len(row["diff_to_control"]) == 3
    assert row["ppl_windows"] == 5 and len(row["ppl_ratio_to_control"]) == 3
    md = (tmp_path / "out" / "fair_ladder.md").read_text()
    assert "### Zero-shot" in md and "piqa (n=6)" in md and "whole WikiText-2 test split" in md
    # the export must be the job's model: another job's recorded window losses are refused
    other = json.loads((tmp_path / "w" / "jobs" / "s2-seed0-fixed-kd.json").read_text())
    train["metrics"]["ppl_window_nll"] = [x + 0.01 for x in other["metrics"]["ppl_window_nll"]]
    with pytest.raises(StageError, match="not the model the job measured"):
        ladder_eval.run_eval(tmp_path / "w", train, ["piqa"], 2, 4, None, max_windows=3)
    # a job whose export was removed is skipped with a message, and the ladder goes on with the next job
    import shutil
    shutil.rmtree(tmp_path / "w" / "steps2" / "seed0" / "fixed-kd" / "export")
    shutil.rmtree(tmp_path / "w" / "eval")
    assert fl.main([*args[:args.index("--jobs")], "--jobs", "eval-s2-seed0-fixed-kd", "eval-s2-seed0-ast-default"]) == 0
    assert sorted(p.name for p in (tmp_path / "w" / "eval").iterdir()) == ["eval-s2-seed0-ast-default.json"]


@pytest.mark.parametrize("record", sorted((REPO / "bench" / "results" / "fair_ladder_eval").glob("*.json")),
                         ids=lambda p: p.stem)
def test_the_recorded_headline_rows_extend_their_training_jobs(record: Path) -> None:
    """Each committed headline evaluation scored its training job's model (the job's windows give the losses it
    recorded), on the whole split, and its accuracies are the means of the items it kept."""
    from bench.ladder_eval import CHECK_TOL
    ev = json.loads(record.read_text())
    train = json.loads((REPO / "bench" / "results" / "fair_ladder_jobs" / f"{record.stem.removeprefix('eval-')}.json")
                       .read_text())
    assert ev["job"] == train["job"]
    want = train["metrics"]["ppl_window_nll"]
    assert ev["window_nll"][:len(want)] == pytest.approx(want, abs=CHECK_TOL)
    assert ev["ppl_windows"] == len(ev["window_nll"]) == 595  # the whole WikiText-2 test split at 512 tokens
    for task, items in ev["items"].items():
        assert len(items) == ev["docs"][task] <= ev["limit"] and sum(items) / len(items) == pytest.approx(ev["acc"][task])
