"""Zero-shot accuracy with lm-eval 0.4.13, from the local data mirror when it has the task.

The task definitions are data: one YAML per task in ``ast_core/lm_eval_tasks/`` with the
same prompt (``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice``), splits and metrics
as lm-eval's built-in task of the same name, pointing at the Hugging Face hub.
:func:`prepare_local_tasks` converts the mirror's files once into the fields the hub
versions have and writes, next to them, a YAML per task that ``include``s the package YAML
and replaces only the data source (``dataset_path: json`` + absolute ``data_files``).
Task names stay the standard ones (``boolq``, ``piqa``, ...), so result keys match lm-eval's.
The converted files live in ``$XDG_CACHE_HOME/ast-pipeline/lm_eval_data/<mirror hash>/`` by
default (absolute paths differ per machine, so they are generated, never committed); the same
folder works with the CLI: ``lm_eval --include_path <that folder> --tasks piqa ...``.

Local tasks are indexed with ``TaskManager(include_path=<folder>, include_defaults=False)``
(skipping lm-eval's ~16 s scan of its own tasks) and never touch the hub. Hub tasks
(HellaSwag, or any task the mirror lacks) are loaded from the package YAML by path, and only
with ``offline=False``.

Why convert instead of pointing lm-eval at the raw files: the prompts index fields by
their hub names (GLUE RTE ``sentence1``/``label`` int, OBQA ``question_stem``, ARC
``choices.label`` lists, PIQA/WinoGrande labels inside the record), and the mirror stores
the original release formats.

Accuracy is the ``acc`` metric for every task (argmax over the summed log-likelihood of
each choice; for LAMBADA, whether the target word is the greedy continuation). Papers
often quote ``acc_norm`` (length-normalised) for ARC, OBQA, HellaSwag and PIQA; pass
``metric="acc_norm"`` to get it where the task defines it.

``lm_eval`` is imported lazily inside the functions that need it, so importing
``ast_core`` never pulls it in.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import data_mirror
from .atomic import atomic_write_bytes
from .registry import TASKS_DIR, ZERO_SHOT_TASKS

"""The package's task YAMLs (hub sources); local variants ``include`` them by absolute path."""

CONVERTER_VERSION = 1
"""Bump when a converter's output changes, so cached conversions are redone."""

RTE_LABELS = {"entailment": 0, "not_entailment": 1}
"""GLUE RTE label ids, the order of lm-eval's choices ["True", "False"]."""


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _read_labels(path: Path, n: int) -> list[str]:
    """Labels from a ``.lst`` file, one per line, which must match the records one to one."""
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != n:
        raise ValueError(f"{path}: {len(labels)} labels for {n} records; the files must match line by line")
    return labels


def _boolq(paths: list[Path]) -> list[dict[str, Any]]:
    """SuperGLUE BoolQ with a JSON bool label -> label int (0 = no/false, 1 = yes/true)."""
    rows = _read_jsonl(paths[0])
    for r in rows:
        if not isinstance(r["label"], bool):
            raise ValueError(f"{paths[0]}: BoolQ label must be a JSON bool, got {r['label']!r} (idx {r.get('idx')})")
    return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": int(r["label"])}
            for r in rows]


def _rte(paths: list[Path]) -> list[dict[str, Any]]:
    """SuperGLUE RTE (premise, hypothesis, label str) -> GLUE fields with 0 = entailment."""
    return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": RTE_LABELS[r["label"]],
             "idx": r["idx"]} for r in _read_jsonl(paths[0])]


def _winogrande(paths: list[Path]) -> list[dict[str, Any]]:
    """WinoGrande dev.jsonl joined line by line with dev-labels.lst into ``answer`` ("1"/"2")."""
    rows = _read_jsonl(paths[0])
    labels = _read_labels(paths[1], len(rows))
    out = []
    for i, (r, lab) in enumerate(zip(rows, labels)):
        if lab not in ("1", "2") or r.get("answer", lab) != lab:
            raise ValueError(f"{paths[1]} line {i + 1}: label {lab!r} vs record answer {r.get('answer')!r}")
        out.append({"qID": r["qID"], "sentence": r["sentence"], "option1": r["option1"],
                    "option2": r["option2"], "answer": lab})
    return out


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def _arc(paths: list[Path]) -> list[dict[str, Any]]:
    """Original ARC (question.stem, question.choices[]) -> HF ai2_arc (question str, choices{text,label})."""
    return [{"id": r["id"], "question": r["question"]["stem"], "choices": _choices(r["question"]),
             "answerKey": r["answerKey"]} for r in _read_jsonl(paths[0])]


def _openbookqa(paths: list[Path]) -> list[dict[str, Any]]:
    """Original OpenBookQA -> HF openbookqa/main (``question_stem``, choices{text,label})."""
    return [{"id": r["id"], "question_stem": r["question"]["stem"], "choices": _choices(r["question"]),
             "answerKey": r["answerKey"]} for r in _read_jsonl(paths[0])]


def _piqa(paths: list[Path]) -> list[dict[str, Any]]:
    """PIQA valid.jsonl joined line by line with valid-labels.lst into ``label`` int."""
    rows = _read_jsonl(paths[0])
    labels = _read_labels(paths[1], len(rows))
    if set(labels) - {"0", "1"}:
        raise ValueError(f"{paths[1]}: PIQA labels must be 0/1, found {sorted(set(labels))}")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
            for r, lab in zip(rows, labels)]


def _lambada(paths: list[Path]) -> list[dict[str, Any]]:
    """LAMBADA (OpenAI) is already ``{"text": ...}``; the YAML splits off the last word."""
    return [{"text": r["text"]} for r in _read_jsonl(paths[0])]


@dataclass(frozen=True)
class LocalSource:
    """Where a task's data lies in the mirror, which split it is, and how to convert it."""

    files: tuple[str, ...]
    split: str  # the lm-eval split the file stands for: "validation" or "test"
    convert: Callable[[list[Path]], list[dict[str, Any]]]


LOCAL_SOURCES: dict[str, LocalSource] = {
    "boolq": LocalSource(("superglue_boolq/val.jsonl",), "validation", _boolq),
    "rte": LocalSource(("superglue_rte/val.jsonl",), "validation", _rte),
    "winogrande": LocalSource(("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), "validation", _winogrande),
    "arc_easy": LocalSource(("arc/ARC-Easy-Test.jsonl",), "test", _arc),
    "arc_challenge": LocalSource(("arc/ARC-Challenge-Test.jsonl",), "test", _arc),
    "openbookqa": LocalSource(("openbookqa/test.jsonl",), "test", _openbookqa),
    "piqa": LocalSource(("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", _piqa),
    "lambada_openai": LocalSource(("lambada_openai/lambada_test.jsonl",), "test", _lambada),
}

TASKS: tuple[str, ...] = ZERO_SHOT_TASKS
"""Every supported task: one per ``lm_eval_tasks/<name>.yaml`` (all but hellaswag read the local mirror)."""


def _mirror_root(mirror: Path | None) -> Path | None:
    """``mirror`` itself, or the default one (:func:`ast_core.data.data_mirror`) when None."""
    return Path(mirror).expanduser() if mirror is not None else data_mirror()


def default_cache_dir(mirror: Path) -> Path:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``)/ast-pipeline/lm_eval_data/<hash of the mirror path>.

    One folder per mirror, so two mirrors never overwrite each other's converted files.
    """
    root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    key = hashlib.sha256(str(Path(mirror).expanduser().resolve()).encode()).hexdigest()[:12]
    return root / "ast-pipeline" / "lm_eval_data" / key


def available_tasks(mirror: Path | None = None) -> dict[str, str]:
    """Task name -> "local" when every source file is in ``mirror``, else "hub".

    ``mirror=None`` means the default mirror (``$AST_DATA_MIRROR``, else ``../shared/data`` next to
    the repository); a missing mirror makes every task "hub".
    """
    return _kinds(_mirror_root(mirror))


def _kinds(root: Path | None) -> dict[str, str]:
    out = {}
    for name in TASKS:
        src = LOCAL_SOURCES.get(name)
        local = root is not None and src is not None and all((root / f).is_file() for f in src.files)
        out[name] = "local" if local else "hub"
    return out


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched (its mtime keys the datasets cache)."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def _source_stamp(files: list[Path]) -> str:
    """Fingerprint of the converter version and each source file's size and mtime."""
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps([CONVERTER_VERSION, stats]).encode()).hexdigest()[:16]


def _local_yaml(name: str, src: LocalSource, mirror: Path, data_file: Path, stamp: str) -> str:
    """The local variant: the package YAML with the data source replaced (JSON strings are YAML)."""
    q = json.dumps
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{src.split}_split"] = src.split
    lines = [
        f"# Generated by ast_core.zeroshot.prepare_local_tasks from {', '.join(src.files)}",
        f"# in {mirror} (source stamp {stamp}); do not edit.",
        f"include: {q(str(TASKS_DIR / f'{name}.yaml'))}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        f"    {src.split}: {q(str(data_file))}",
        *(f"{k}: {'null' if v is None else v}" for k, v in splits.items()),
    ]
    return "\n".join(lines) + "\n"


def prepare_local_tasks(mirror: Path, out_dir: Path, tasks: list[str] | None = None) -> Path:
    """Convert the mirror's tasks into ``out_dir/data/<task>.jsonl`` + ``out_dir/<task>.yaml``.

    Returns ``out_dir``, the folder to give lm-eval as ``include_path``. ``tasks`` limits the
    work to those names (default: every task the mirror has; others are skipped). Idempotent:
    a task whose YAML already carries the same source stamp (converter version, source sizes
    and mtimes) and whose data file exists is left alone, and no file is rewritten with the
    same bytes, so the ``datasets`` cache keyed on the data file stays valid.
    """
    mirror = Path(mirror).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    kinds = _kinds(mirror)
    for name in tasks if tasks is not None else list(LOCAL_SOURCES):
        if kinds.get(name) != "local":
            continue
        src = LOCAL_SOURCES[name]
        files = [mirror / f for f in src.files]
        data_file = out_dir / "data" / f"{name}.jsonl"
        yaml_file = out_dir / f"{name}.yaml"
        text = _local_yaml(name, src, mirror, data_file, _source_stamp(files))
        if data_file.is_file() and yaml_file.is_file() and yaml_file.read_text(encoding="utf-8") == text:
            continue
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in src.convert(files))
        _write_if_changed(data_file, payload.encode("utf-8"))
        _write_if_changed(yaml_file, text.encode("utf-8"))  # last: a crash before it means redo
    return out_dir


def resolve_tasks(tasks: list[str], mirror: Path | None = None, offline: bool = True,
                  cache_dir: Path | None = None) -> tuple[list[str], Path | None]:
    """lm-eval task specs for ``tasks`` and the include path holding the local ones.

    Local tasks are given by name (indexed from the include path); hub tasks by the absolute
    path of the package YAML, so no local and hub definition of one name meet in one index.
    Raises ``ValueError`` naming the task when it is unknown, or hub-only while ``offline``.
    """
    root = _mirror_root(mirror)
    kinds = _kinds(root)
    for name in tasks:
        if name not in kinds:
            raise ValueError(f"unknown zero-shot task {name!r}; supported: {', '.join(TASKS)}")
        if kinds[name] == "hub" and offline:
            if name not in LOCAL_SOURCES:
                where = "the data mirror has no copy of it"
            elif root is None:
                where = "no data mirror was found (set AST_DATA_MIRROR or pass mirror=)"
            else:
                where = f"its files ({', '.join(LOCAL_SOURCES[name].files)}) are not in the mirror {root}"
            raise ValueError(f"zero-shot task {name!r} needs the Hugging Face hub: {where}, "
                             "and offline=True forbids the hub")
    include = None
    local = [t for t in tasks if kinds[t] == "local"]
    if local:
        assert root is not None  # a task is only "local" when the mirror exists
        include = prepare_local_tasks(root, cache_dir if cache_dir is not None else default_cache_dir(root), local)
    specs = [t if kinds[t] == "local" else str(TASKS_DIR / f"{t}.yaml") for t in tasks]
    return specs, include


def zero_shot(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None,
              batch_size: int = 8, mirror: Path | None = None, offline: bool = True,
              metric: str = "acc", cache_dir: Path | None = None) -> dict[str, float]:
    """Zero-shot ``metric`` per task via ``lm_eval.simple_evaluate`` on an in-memory model.

    ``limit`` takes the first ``limit`` documents of each task (lm-eval's order). The model is
    evaluated in eval mode and its train/eval mode is restored afterwards; the global RNGs are
    not reseeded (lm-eval would otherwise reset them), so a training run is not perturbed.
    """
    return zero_shot_counted(model, tokenizer, tasks, limit, batch_size, mirror, offline, metric, cache_dir)[0]


def zero_shot_counted(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None,
                      batch_size: int = 8, mirror: Path | None = None, offline: bool = True,
                      metric: str = "acc", cache_dir: Path | None = None) -> tuple[dict[str, float], dict[str, int]]:
    """:func:`zero_shot`, plus the number of documents each accuracy is over."""
    r = zero_shot_result(model, tokenizer, tasks, limit, batch_size, mirror, offline, metric, cache_dir)
    return r.scores, r.counts


@dataclass(frozen=True)
class ZeroShotResult:
    """Per task: the metric, the number of documents and, with ``items=True``, lm-eval's standard error of
    the metric and the metric of each document in document order, for paired comparisons."""

    scores: dict[str, float]
    stderr: dict[str, float | None]
    counts: dict[str, int]
    items: dict[str, list[float]]


def zero_shot_result(model: Any, tokenizer: Any, tasks: list[str], limit: int | None = None,
                     batch_size: int = 8, mirror: Path | None = None, offline: bool = True,
                     metric: str = "acc", cache_dir: Path | None = None, items: bool = False) -> ZeroShotResult:
    """:func:`zero_shot`, and with ``items`` lm-eval's standard errors (closed form for ``acc``:
    sqrt(p(1-p)/(n-1))) and each document's score (lm-eval's logged samples, sorted by ``doc_id``).
    Without ``items`` no standard error is computed (None): for a bootstrapped metric such as LAMBADA's
    perplexity lm-eval would fork a process pool, which the pipeline's evaluate stage has no use for."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs, include = resolve_tasks(list(tasks), mirror, offline, cache_dir)
    manager = TaskManager(include_path=str(include) if include else None, include_defaults=False)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # bootstrap_iters > 0 switches stderr on: a mean's (acc's) stderr is closed form, never resampled
        out = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, num_fewshot=0,
                                      limit=limit, bootstrap_iters=1000 if items else 0, log_samples=items,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    finally:
        model.train(was_training)
    results = out["results"]
    scores, stderr, counts, per_doc = {}, {}, {}, {}
    key = f"{metric},none"
    for name in tasks:
        if key not in results[name]:
            raise ValueError(f"task {name!r} has no metric {metric!r}; it reports "
                             f"{sorted(k.split(',')[0] for k in results[name] if ',' in k)}")
        scores[name] = float(results[name][key])
        se = results[name].get(f"{metric}_stderr,none")
        stderr[name] = float(se) if isinstance(se, (int, float)) else None
        counts[name] = int(out.get("n-samples", {}).get(name, {}).get("effective", limit or 0))
        if items:
            samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
            per_doc[name] = [float(s[metric]) for s in samples]
    return ZeroShotResult(scores, stderr, counts, per_doc)


def include_path(tasks: list[str] | None = None, mirror: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The folder to give ``lm_eval --include_path`` for the mirror's tasks (converted if needed).

    ``tasks`` defaults to every task the mirror holds. Raises ``ValueError`` when there is no
    mirror or it holds none of them.
    """
    root = _mirror_root(mirror)
    kinds = _kinds(root)
    wanted = list(tasks) if tasks is not None else [t for t in LOCAL_SOURCES if kinds[t] == "local"]
    local = [t for t in wanted if kinds.get(t) == "local"]
    if root is None or not local:
        raise ValueError(f"no local zero-shot tasks to convert (mirror {root}, tasks {wanted}); "
                         "set AST_DATA_MIRROR to the data mirror")
    return prepare_local_tasks(root, cache_dir if cache_dir is not None else default_cache_dir(root), local)
