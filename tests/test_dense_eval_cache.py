"""The dense teacher is measured once per (weights, tokenizer, evaluate settings, code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import evaluate
from tasks.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "params" / "tiny.yaml")
FAST = ["--set", "train.steps=2", "--set", "train.eval_every=0", "--set", "evaluate.zero_shot.enabled=false",
        "--set", "evaluate.max_windows=1", "--set", "evaluate.seq_len=64"]


def test_dense_scores_are_measured_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   shared_data: Path) -> None:
    monkeypatch.setenv("AST_DENSE_CACHE", "on")
    # the embedded tokenizer stays where set-up put it; only the dense-score cache moves
    monkeypatch.setattr(evaluate, "cache_root", lambda: tmp_path / "cache")
    calls = []
    real = evaluate._measure
    monkeypatch.setattr(evaluate, "_measure", lambda ctx, model, tok: calls.append(model) or real(ctx, model, tok))

    assert main(["run", "--params", TINY, "--out", str(tmp_path / "a"), "--no-progress", *FAST]) == 0
    assert len(calls) == 4  # trained model, export (base + SLoRB adapter), 2:4 base alone, dense
    entries = list((tmp_path / "cache" / "dense_eval").glob("*.json"))
    assert len(entries) == 1
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert json.loads(entries[0].read_text())["ppl"] == first["ppl_wikitext2_dense"]

    # another method (no SLoRB), same teacher and evaluate settings: only the trained model and its export
    assert main(["run", "--params", TINY, "--out", str(tmp_path / "b"), "--no-progress", *FAST,
                 "--set", "train.method=naive"]) == 0
    assert len(calls) == 6
    second = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert second["ppl_wikitext2_dense"] == first["ppl_wikitext2_dense"]

    # other evaluate settings are another key: measured again
    assert main(["run", "--params", TINY, "--out", str(tmp_path / "c"), "--no-progress", *FAST[:-2],
                 "--set", "evaluate.seq_len=32"]) == 0
    assert len(calls) == 10 and len(list((tmp_path / "cache" / "dense_eval").glob("*.json"))) == 2


def test_a_damaged_entry_is_measured_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           shared_data: Path) -> None:
    monkeypatch.setattr(evaluate, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setenv("AST_DENSE_CACHE", "on")
    assert main(["run", "--params", TINY, "--out", str(tmp_path / "a"), "--no-progress", *FAST]) == 0
    entry = next((tmp_path / "cache" / "dense_eval").glob("*.json"))
    good = json.loads(entry.read_text())
    entry.write_text("{not json")
    assert main(["run", "--params", TINY, "--out", str(tmp_path / "b"), "--no-progress", *FAST,
                 "--set", "train.method=naive"]) == 0
    assert json.loads(entry.read_text()) == good
