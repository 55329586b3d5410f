"""Words for settings that several bench reports print (kept free of torch: report.py imports it)."""

from __future__ import annotations


def cache_label(tc: dict) -> str:
    """What a teacher-cache config stores, in words (top-k keeps k logits; sampled keeps draws)."""
    fmt = tc.get("format")
    if fmt == "topk":
        return f"top-{tc.get('k')}"
    if fmt == "sampled":
        return f"sampled, {tc.get('samples')} draws"
    return f"{fmt} (head {tc.get('k')} + {tc.get('samples')} draws)"
