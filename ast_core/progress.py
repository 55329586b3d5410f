"""One progress bar for the long loops (teacher cache, training, perplexity).

Why one helper: the stages pass a single ``progress`` switch down (off under
Prefect, whose logs a redrawn bar would garble, and on ranks other than 0);
every loop honours it the same way and gets the same bar.
"""

from __future__ import annotations

from typing import Iterable, TypeVar

T = TypeVar("T")


def bar(it: Iterable[T], enabled: bool, desc: str, total: int | None = None, initial: int = 0) -> Iterable[T]:
    """``it`` wrapped in a tqdm bar when ``enabled``; ``it`` itself otherwise.

    Callers that want a live postfix check ``hasattr(result, "set_postfix")``,
    so a disabled bar costs nothing.
    """
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, initial=initial, dynamic_ncols=True)
