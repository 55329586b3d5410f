"""Token-level perplexity the way GPTQ / SparseGPT / Wanda (and the AST paper) compute it.

Convention, implemented exactly:

1. The evaluation text is tokenised once as ``tokenizer(text, return_tensors="pt")``.
   SmolLM2's tokenizer adds no BOS/EOS there (``add_bos_token`` is False), so
   the stream is the text's tokens only; a tokenizer that does add a BOS (the
   LLaMA one) puts a single BOS at the very front, as in the papers.
2. The stream is cut into ``n = N // L`` non-overlapping windows of ``L =
   seq_len`` tokens; the last partial window is dropped.
3. Each window is scored alone (no context carried over): its loss is the mean
   next-token NLL over its ``L − 1`` predicted positions, i.e.
   ``model(w, labels=w).loss``.
4. The papers sum ``loss_w · L`` and divide by ``n · L``:
   ``ppl = exp(Σ_w loss_w · L / (n · L)) = exp(mean_w loss_w)``. Since every
   window predicts the same ``L − 1`` tokens, this is also the exact token-level
   mean: ``nll_mean = Σ NLL / (n · (L − 1))``.

The NLL is computed here from the logits in float32 (log-softmax + gather via
``cross_entropy``), which equals ``model(w, labels=w).loss`` without depending
on how a given ``transformers`` version averages over a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .progress import bar as progress_bar


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float       # exp(nll_mean)
    nll_mean: float  # mean next-token NLL (nats) over all predicted tokens
    tokens: int      # predicted tokens: windows · (seq_len − 1)
    windows: int     # windows scored
    window_nll: tuple[float, ...] = ()  # mean NLL of each window, in order (for intervals and paired tests)

    @property
    def interval(self) -> tuple[float, float] | None:
        """95% bootstrap interval of the perplexity over windows (None for a single window)."""
        from .intervals import ppl_interval
        return ppl_interval(self.window_nll) if len(self.window_nll) > 1 else None

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "nll_mean": self.nll_mean, "tokens": self.tokens, "windows": self.windows,
                "ppl_ci95": list(self.interval) if self.interval else None, "window_nll": list(self.window_nll)}


def _as_stream(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids))
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"input_ids must be one stream [1, N], got shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"input_ids must be [1, N] or [N], got shape {tuple(ids.shape)}")
    return ids.long()


def _max_positions(model: torch.nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def perplexity(model: PreTrainedModel, input_ids: torch.Tensor | Sequence[int], seq_len: int,
               max_windows: int | None = None, batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream, over non-overlapping ``seq_len`` windows.

    ``ppl = exp(mean_w loss_w)`` with ``loss_w`` the mean NLL of window ``w``'s
    ``seq_len − 1`` next-token predictions (module docstring). ``max_windows``
    scores only the first windows (a cheap, comparable prefix; None: the whole stream). ``batch_size``
    windows run per forward; it does not change the result beyond float noise.
    The model runs in eval mode under ``no_grad``; its training flag is restored.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (one predicted token), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len={seq_len} exceeds the model's {limit} positions")
    stream = _as_stream(input_ids)
    n_windows = stream.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"{stream.numel()} tokens give no full window of seq_len={seq_len}")
    device = next(model.parameters()).device
    windows = stream[: n_windows * seq_len].view(n_windows, seq_len)

    was_training = model.training
    model.eval()
    total_nll = 0.0
    per_window: list[float] = []
    bar = progress_bar(range(0, n_windows, batch_size), progress, "perplexity", total=-(-n_windows // batch_size))
    try:
        for b in bar:
            batch = windows[b:b + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="none").view(len(batch), -1)
            per_window.extend(nll.mean(dim=1).tolist())
            total_nll += nll.sum().item()
            if hasattr(bar, "set_postfix"):
                done = min(b + batch_size, n_windows)
                bar.set_postfix(ppl=f"{math.exp(total_nll / (done * (seq_len - 1))):.3f}")
    finally:
        model.train(was_training)
    tokens = n_windows * (seq_len - 1)
    nll_mean = total_nll / tokens
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens=tokens, windows=n_windows,
                            window_nll=tuple(per_window))


def wikitext2_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seq_len: int = 512,
                         max_windows: int | None = None, split: str = "test", batch_size: int = 1,
                         progress: bool = False) -> PerplexityResult:
    """WikiText-2 perplexity: ``tokenizer("\\n\\n".join(rows), return_tensors="pt")`` then :func:`perplexity`."""
    from .data import wikitext2_eval_text

    enc = tokenizer(wikitext2_eval_text(split), return_tensors="pt", verbose=False)
    return perplexity(model, enc["input_ids"], seq_len, max_windows=max_windows,
                      batch_size=batch_size, progress=progress)
