"""Document functions the task YAMLs in this folder reference as ``!function utils.<name>``.

lm-eval loads this file by path (relative to the YAML that names it), so it is not
part of the ``ast_core`` package and imports nothing outside the standard library.
The semantics equal lm-eval 0.4.13's built-in ``winogrande`` and ``hellaswag`` tasks.
"""

from __future__ import annotations

import re
from typing import Any

# --- WinoGrande: "partial evaluation" (Trinh & Le 2018; Sakaguchi et al. 2019) -----------------
# The two candidates differ in the *context* (the sentence up to the blank, with option 1 or 2
# filled in); both are scored on the same continuation (the rest of the sentence after "_").
# lm-eval treats an int returned by doc_to_text as "several contexts, one continuation", and
# the int is then the gold index.


def winogrande_gold_index(doc: dict[str, Any]) -> int:
    """Gold option index: answer "1" -> 0, "2" -> 1."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: dict[str, Any]) -> str:
    """The shared continuation: the sentence after the blank, stripped."""
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1:].strip()


def winogrande_contexts(doc: dict[str, Any]) -> list[str]:
    """One context per option: the sentence before the blank followed by that option."""
    prefix = doc["sentence"][:doc["sentence"].index("_")]
    return [prefix + doc["option1"], prefix + doc["option2"]]


# --- HellaSwag ------------------------------------------------------------------------------


def _hellaswag_clean(text: str) -> str:
    """Drop the WikiHow bracket artefacts ("[title]" becomes ". ", other "[...]" vanish)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": _hellaswag_clean(doc["activity_label"] + ": " + context),
        "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: Any) -> Any:
    """Add ``query`` / ``choices`` / ``gold`` to each row of a ``datasets.Dataset``."""
    return dataset.map(_hellaswag_doc)
