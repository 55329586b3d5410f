"""Zero-shot evaluation: local task conversion, lm-eval task definitions, and accuracy.

The central check (``test_lm_eval_accuracy_equals_hand_computed_choice_argmax``) reads the
RAW mirror files, scores every choice with the model directly, and requires lm-eval's
accuracy on the converted local tasks to be the same number.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch

from ast_core import zeroshot as zs

COUNTS = {"boolq": 3270, "rte": 277, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172,
          "openbookqa": 500, "piqa": 1838, "lambada_openai": 5153}
FIELDS = {
    "boolq": {"question", "passage", "idx", "label"},
    "rte": {"sentence1", "sentence2", "label", "idx"},
    "winogrande": {"qID", "sentence", "option1", "option2", "answer"},
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "openbookqa": {"id", "question_stem", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "lambada_openai": {"text"},
}
LM_EVAL_TASKS = Path(importlib.util.find_spec("lm_eval").origin).parent / "tasks"
BUILTIN_YAML = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
                "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
                "piqa": "piqa/piqa.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def prepared(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return zs.prepare_local_tasks(shared_data, tmp_path_factory.mktemp("lm_eval_data"))


@pytest.fixture(scope="session")
def converted(prepared: Path) -> dict[str, list[dict]]:
    return {name: _jsonl(prepared / "data" / f"{name}.jsonl") for name in COUNTS}


# --- availability and errors ---------------------------------------------------------------


def test_mirror_tasks_are_local_and_hellaswag_is_hub(shared_data: Path, tmp_path: Path) -> None:
    assert zs.available_tasks(shared_data) == {**{t: "local" for t in COUNTS}, "hellaswag": "hub"}
    assert set(zs.available_tasks(tmp_path).values()) == {"hub"}  # an empty mirror has nothing


def test_default_mirror_follows_env(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AST_DATA_MIRROR", str(tmp_path))
    assert set(zs.available_tasks(None).values()) == {"hub"}
    monkeypatch.setenv("AST_DATA_MIRROR", str(shared_data))
    assert zs.available_tasks(None)["piqa"] == "local"


def test_hub_only_task_offline_raises_naming_the_task(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'hellaswag'.*offline=True"):
        zs.resolve_tasks(["piqa", "hellaswag"], mirror=shared_data, offline=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="'piqa'.*not in the mirror"):
        zs.resolve_tasks(["piqa"], mirror=tmp_path / "empty", offline=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown zero-shot task 'mmlu'"):
        zs.resolve_tasks(["mmlu"], mirror=shared_data, cache_dir=tmp_path)


def test_online_hub_task_resolves_to_package_yaml_and_local_by_name(shared_data: Path, tmp_path: Path) -> None:
    specs, include = zs.resolve_tasks(["piqa", "hellaswag"], mirror=shared_data, offline=False, cache_dir=tmp_path)
    assert specs == ["piqa", str(zs.TASKS_DIR / "hellaswag.yaml")]
    assert include == tmp_path.resolve() and sorted(p.name for p in include.glob("*.yaml")) == ["piqa.yaml"]


# --- conversion ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_converted_file_has_record_count_and_hub_fields(converted: dict[str, list[dict]], name: str) -> None:
    rows = converted[name]
    assert len(rows) == COUNTS[name]
    assert all(set(r) == FIELDS[name] for r in rows)


def test_rte_label_maps_entailment_to_zero(converted: dict[str, list[dict]], shared_data: Path) -> None:
    raw = _jsonl(shared_data / "superglue_rte/val.jsonl")
    rte = converted["rte"]
    assert raw[0]["label"] == "not_entailment" and rte[0]["label"] == 1
    assert raw[1]["label"] == "entailment" and rte[1]["label"] == 0
    assert (rte[0]["sentence1"], rte[0]["sentence2"]) == (raw[0]["premise"], raw[0]["hypothesis"])
    assert sum(r["label"] == 0 for r in rte) == 146  # README: 146 entailment / 131 not


def test_piqa_and_winogrande_labels_are_joined_line_by_line(converted: dict[str, list[dict]],
                                                            shared_data: Path) -> None:
    assert [r["label"] for r in converted["piqa"][:3]] == [0, 1, 1]
    assert [str(r["label"]) for r in converted["piqa"]] == _lines(shared_data / "piqa/valid-labels.lst")
    assert converted["piqa"][0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert [r["answer"] for r in converted["winogrande"][:3]] == ["2", "1", "2"]
    assert [r["answer"] for r in converted["winogrande"]] == _lines(shared_data / "winogrande/dev-labels.lst")


def test_boolq_label_becomes_int_and_arc_obqa_are_flattened(converted: dict[str, list[dict]]) -> None:
    assert {r["label"] for r in converted["boolq"]} == {0, 1}
    assert sum(r["label"] for r in converted["boolq"]) == 2033  # README: 2,033 true
    arc = converted["arc_easy"][0]
    assert arc["question"].startswith("Which statement best explains why photosynthesis")
    assert arc["choices"]["label"] == ["A", "B", "C", "D"] and arc["answerKey"] == "A"
    obqa = converted["openbookqa"][1]
    assert obqa["question_stem"] == "There is most likely going to be fog around:"
    assert obqa["choices"]["text"][0] == "a marsh"


def test_winogrande_label_file_disagreeing_with_record_is_rejected(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande/dev.jsonl").write_text(
        (shared_data / "winogrande/dev.jsonl").read_text(encoding="utf-8").splitlines()[0] + "\n")
    (tmp_path / "winogrande/dev-labels.lst").write_text("1\n")  # the record says "2"
    with pytest.raises(ValueError, match="dev-labels.lst line 1"):
        zs.prepare_local_tasks(tmp_path, tmp_path / "out")


def test_prepare_is_idempotent_and_redoes_a_damaged_task(shared_data: Path, tmp_path: Path) -> None:
    out = zs.prepare_local_tasks(shared_data, tmp_path, ["rte", "piqa"])
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.relative_to(out).as_posix() for p in files] == ["data/piqa.jsonl", "data/rte.jsonl",
                                                              "piqa.yaml", "rte.yaml"]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert zs.prepare_local_tasks(shared_data, tmp_path, ["rte", "piqa"]) == out
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    (out / "data/rte.jsonl").unlink()
    zs.prepare_local_tasks(shared_data, tmp_path, ["rte", "piqa"])
    assert len(_jsonl(out / "data/rte.jsonl")) == 277
    assert (out / "data/piqa.jsonl").stat().st_mtime_ns == stamps[out / "data/piqa.jsonl"]


def test_generated_yaml_points_at_absolute_local_file(prepared: Path) -> None:
    text = (prepared / "arc_challenge.yaml").read_text()
    assert f'include: "{zs.TASKS_DIR / "arc_challenge.yaml"}"' in text
    assert "dataset_path: json" in text
    assert f'test: "{prepared / "data" / "arc_challenge.jsonl"}"' in text


# --- task definitions against lm-eval's own --------------------------------------------------


@pytest.mark.parametrize("name", zs.TASKS)
def test_package_yaml_keeps_lm_eval_builtin_prompt_and_metrics(name: str) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(zs.TASKS_DIR / f"{name}.yaml", resolve_func=False)
    ref = load_yaml(LM_EVAL_TASKS / BUILTIN_YAML[name], resolve_func=False)
    keys = ["task", "dataset_path", "dataset_name", "output_type", "training_split", "validation_split",
            "test_split", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter"]
    for key in keys:
        a, b = ours.get(key), ref.get(key)
        if isinstance(b, str) and b.startswith(str(LM_EVAL_TASKS)):  # an unresolved !function
            assert isinstance(a, str) and a.startswith(str(zs.TASKS_DIR)), f"{name}.{key}: {a!r}"
            continue  # the functions themselves are compared on documents below
        assert a == b, f"{name}.{key}: {a!r} != lm-eval's {b!r}"
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in ref["metric_list"]]
    assert ours["metadata"]["version"] == ref["metadata"]["version"]


def test_winogrande_functions_equal_lm_eval_partial_evaluation(converted: dict[str, list[dict]]) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(zs.TASKS_DIR / "winogrande.yaml")
    ref = load_yaml(LM_EVAL_TASKS / "winogrande/default.yaml")
    for doc in converted["winogrande"][:50]:
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            assert ours[key](doc) == ref[key](doc)


def test_hellaswag_process_docs_equals_lm_eval() -> None:
    import datasets
    from lm_eval.tasks._yaml_loader import load_yaml

    doc = {"ind": 4, "activity_label": "Removing ice from car",
           "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
                    "clothes smiles. [title] then,", "ctx_b": "the man continues removing the snow on his car.",
           "ctx": "", "endings": [", the man adds wax to the windshield [step] and cuts it.",
                                  ", a person board a ski lift,  while two men supporting the head.",
                                  ", the man puts on a christmas coat, knitted with netting.",
                                  ", the man continues removing the snow on his car."],
           "source_id": "x", "split": "val", "split_type": "indomain", "label": "3"}
    ds = datasets.Dataset.from_list([doc])
    ours = load_yaml(zs.TASKS_DIR / "hellaswag.yaml")["process_docs"](ds)[0]
    ref = load_yaml(LM_EVAL_TASKS / "hellaswag/hellaswag.yaml")["process_docs"](ds)[0]
    assert {k: ours[k] for k in ("query", "choices", "gold")} == {k: ref[k] for k in ("query", "choices", "gold")}
    assert "[" not in ours["query"] and ours["gold"] == 3


def test_lm_eval_reads_local_tasks_with_builtin_prompts(prepared: Path) -> None:
    """lm-eval itself builds every local task offline from the converted file (no model)."""
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(prepared), include_defaults=False).load(list(COUNTS))["tasks"]
    for name, count in COUNTS.items():
        assert len(tasks[name].eval_docs) == count, name
    rte = tasks["rte"]
    doc = rte.eval_docs[0]
    assert rte.doc_to_text(doc) == f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:"
    assert rte.doc_to_choice(doc) == ["True", "False"] and rte.doc_to_target(doc) == 1
    arc = tasks["arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:" and arc.doc_to_target(doc) == 0
    obqa = tasks["openbookqa"]
    assert obqa.doc_to_target(obqa.eval_docs[0]) == 1  # answerKey "B"
    lam = tasks["lambada_openai"]
    doc = lam.eval_docs[0]
    assert lam.doc_to_text(doc) + lam.doc_to_target(doc) == doc["text"]
    assert lam.doc_to_target(doc) == " signs"


# --- accuracy ------------------------------------------------------------------------------


def test_zero_shot_on_tiny_llama_returns_fractions_of_limit(shared_data: Path, tmp_path: Path) -> None:
    from ast_core.models import load_model, load_tokenizer

    model = load_model("tiny:llama")
    model.train()
    scores = zs.zero_shot(model, load_tokenizer("tiny:llama"), ["boolq", "piqa"], limit=5,
                          mirror=shared_data, cache_dir=tmp_path)
    assert set(scores) == {"boolq", "piqa"}
    for acc in scores.values():
        assert 0.0 <= acc <= 1.0 and abs(acc * 5 - round(acc * 5)) < 1e-9
    assert model.training  # the caller's mode is restored


def test_zero_shot_result_gives_each_document_and_lm_evals_stderr(shared_data: Path, tmp_path: Path) -> None:
    """The per-document scores average to the accuracy; the stderr is a mean's, sqrt(p(1-p)/(n-1))."""
    from ast_core.models import load_model, load_tokenizer

    model = load_model("tiny:llama")
    r = zs.zero_shot_result(model, load_tokenizer("tiny:llama"), ["piqa", "winogrande"], limit=12,
                            mirror=shared_data, cache_dir=tmp_path, items=True)
    for name in ("piqa", "winogrande"):
        docs = r.items[name]
        assert len(docs) == r.counts[name] == 12 and set(docs) <= {0.0, 1.0}
        p = r.scores[name]
        assert sum(docs) / 12 == pytest.approx(p, abs=1e-12)
        assert r.stderr[name] == pytest.approx(math.sqrt(p * (1 - p) / 11), rel=1e-9)
    plain = zs.zero_shot_result(model, load_tokenizer("tiny:llama"), ["piqa"], limit=4, mirror=shared_data,
                                cache_dir=tmp_path)  # the pipeline's call: no stderr, no items
    assert plain.stderr == {"piqa": None} and plain.items == {} and plain.counts == {"piqa": 4}


def _sum_logprob(model: torch.nn.Module, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenised as lm-eval does for causal models."""
    whole = tok(context + continuation)["input_ids"]
    n_ctx = len(tok(context)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
    targets = torch.tensor(whole[n_ctx:])
    return logp[n_ctx - 1:].gather(-1, targets[:, None]).sum().item()


def _hand_items(name: str, data: Path, n: int) -> list[tuple[list[tuple[str, str]], int]]:
    """(context, continuation) pairs per item and the gold index, read from the RAW mirror files."""
    if name == "piqa":
        rows, labels = _jsonl(data / "piqa/valid.jsonl")[:n], _lines(data / "piqa/valid-labels.lst")[:n]
        return [([(f"Question: {r['goal']}\nAnswer:", " " + s) for s in (r["sol1"], r["sol2"])], int(lab))
                for r, lab in zip(rows, labels)]
    if name == "arc_easy":
        items = []
        for r in _jsonl(data / "arc/ARC-Easy-Test.jsonl")[:n]:
            ctx = f"Question: {r['question']['stem']}\nAnswer:"
            labels = [c["label"] for c in r["question"]["choices"]]
            items.append(([(ctx, " " + c["text"]) for c in r["question"]["choices"]], labels.index(r["answerKey"])))
        return items
    assert name == "winogrande"  # partial evaluation: the option is in the context
    items = []
    for r, lab in zip(_jsonl(data / "winogrande/dev.jsonl")[:n], _lines(data / "winogrande/dev-labels.lst")[:n]):
        blank = r["sentence"].index("_")
        rest = " " + r["sentence"][blank + 1:].strip()
        items.append(([(r["sentence"][:blank] + opt, rest) for opt in (r["option1"], r["option2"])], int(lab) - 1))
    return items


@pytest.mark.slow
@pytest.mark.parametrize("names", [pytest.param(["piqa", "arc_easy"], marks=pytest.mark.ci, id="piqa-arc_easy"),
                                   pytest.param(["winogrande"], id="winogrande")])
def test_lm_eval_accuracy_equals_hand_computed_choice_argmax(smollm2, smollm2_tokenizer, shared_data: Path,
                                                             tmp_path: Path, names: list[str]) -> None:
    n = 8  # ~1.4k tokens per task scored twice; CPU forward passes dominate the run time
    scores = zs.zero_shot(smollm2, smollm2_tokenizer, names, limit=n, batch_size=8,
                          mirror=shared_data, cache_dir=tmp_path)
    for name in names:
        correct = 0
        for pairs, gold in _hand_items(name, shared_data, n):
            lls = [_sum_logprob(smollm2, smollm2_tokenizer, ctx, cont) for ctx, cont in pairs]
            correct += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        assert scores[name] == pytest.approx(correct / n, abs=1e-12), name


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_smollm2_beats_chance_on_local_tasks_limit_100(smollm2, smollm2_tokenizer, shared_data: Path,
                                                       tmp_path: Path) -> None:
    """Measured accuracy of SmolLM2-135M on the first 100 items of every local task.

    Measured (2 shared CPU cores, ~33 min): arc_easy 0.49, piqa 0.65, winogrande 0.48,
    openbookqa 0.17, rte 0.59, arc_challenge 0.23, lambada_openai 0.30, boolq 0.38.
    """
    t0 = time.perf_counter()
    scores = zs.zero_shot(smollm2, smollm2_tokenizer, list(COUNTS), limit=100, batch_size=16,
                          mirror=shared_data, cache_dir=tmp_path)
    print(f"\nzero-shot acc, limit=100, {time.perf_counter() - t0:.0f} s: "
          + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert scores["arc_easy"] > 0.40 and scores["piqa"] > 0.55 and scores["lambada_openai"] > 0.15


def test_the_task_list_is_the_yaml_folder_and_every_local_source_has_a_yaml() -> None:
    from tasks.config import ZERO_SHOT_TASKS
    yamls = sorted(p.stem for p in zs.TASKS_DIR.glob("*.yaml"))
    assert list(zs.TASKS) == yamls and ZERO_SHOT_TASKS == zs.TASKS and len(yamls) == 9
    assert set(zs.LOCAL_SOURCES) <= set(yamls)
