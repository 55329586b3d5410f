"""Markdown tables and the comparison numbers every report prints (pure Python: no torch).

Used by the evaluate stage (``metrics.md``), the ``compare`` flow and every
benchmark report, so a table looks the same wherever it is printed.
"""

from __future__ import annotations

import math
from typing import Sequence


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A markdown table; ``align`` one char per column ('l' or 'r'), default first left, rest right."""
    align = align or "l" + "r" * (len(head) - 1)
    if len(align) != len(head) or any(len(r) != len(head) for r in rows):
        raise ValueError(f"every row needs {len(head)} cells (and one alignment char each)")
    sep = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def gap_closed(ppl: float, ppl_sparsegpt: float | None, ppl_dense: float | None) -> float | None:
    """(ppl_SparseGPT − ppl)/(ppl_SparseGPT − ppl_dense): 0 for SparseGPT, 1 for dense; None without both."""
    if ppl_sparsegpt is None or ppl_dense is None or math.isclose(ppl_sparsegpt, ppl_dense):
        return None
    return (ppl_sparsegpt - ppl) / (ppl_sparsegpt - ppl_dense) + 0.0  # + 0.0: no "-0.0%" for SparseGPT
