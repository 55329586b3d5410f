"""Knowledge-distillation losses and the sparse teacher targets they train from.

The dense model is the teacher. The per-token loss is the forward KL at
temperature T, scaled by T² so its gradient does not shrink as T grows::

    KL_T = T² · Σ_v p_v (log p_v − log q_v),   p = softmax(t/T),  q = softmax(s/T)

and the training loss is ``α·KL + (1−α)·CE`` (:func:`kd_combine`).

Full-vocabulary teacher logits are too large to cache (49,152 × 2 bytes per
token for SmolLM2), so the cache stage reduces each position to a small target
(a dict of tensors with leading dims ``[B, L]``):

* ``"topk"`` — the k most probable tempered log-probs + indices and the log of
  the mass left over (``rest``). :func:`kl_topk` is the KL over k + 1 buckets:
  the gradient on the k tokens is exact, the tail gets ``q_j(1 − p_rest/q_rest)``
  instead of ``q_j − p_j`` (biased, low variance).
* ``"sampled"`` — S token ids drawn from p, stored as unique ids + counts.
  :func:`kl_sampled` is the cross-entropy against the empirical distribution:
  its gradient ``T·(q − ĉ/S)`` is unbiased for the full-KL gradient
  ``T·(q − p)``.
* ``"head+sampled"`` — the exact top-k head plus S samples from the renormalised
  tail, weighted by the tail mass: unbiased, with less variance where p is peaked.

Sampled targets also store the teacher entropy ``ent`` = H(p): subtracting it
(a constant for the student) turns the logged cross-entropy into an unbiased
estimate of the KL itself, without changing the gradient.

Memory: for V = 49,152 a ``[B, L, V]`` float32 tensor is large, so every
function here holds at most a few of them (gathers on ``log_softmax``, never
one-hot targets). Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import math

import torch

FORMATS = ("topk", "sampled", "head+sampled")
_F32_EPS = float(torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------- helpers

def _tempered_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _masked_token_mean(per_token: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, counting only positions where ``token_mask`` is true."""
    if token_mask is None:
        return per_token.mean()
    if token_mask.shape != per_token.shape:
        raise ValueError(f"token_mask shape {tuple(token_mask.shape)} != token shape {tuple(per_token.shape)}")
    w = token_mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x ≤ 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _xlogx_from_log(logp: torch.Tensor) -> torch.Tensor:
    """p·log p given log p, with 0·log 0 = 0 (a target of −inf is a zero-probability token)."""
    p = logp.exp()
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def _complement_logsumexp(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log Σ_{v ∉ idx} exp(logp_v), exact even when the complement is tiny. Overwrites ``logp``."""
    logp.scatter_(-1, idx, float("-inf"))
    return torch.logsumexp(logp, dim=-1)


def _check_vocab_k(k: int, vocab: int, what: str) -> None:
    if not 0 < k <= vocab:
        raise ValueError(f"{what} must be in [1, {vocab}] (the vocabulary size), got {k}")


# ----------------------------------------------------------------------------- full KL

def kl_full(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over tokens of KL(p_T ‖ q_T), p_T = softmax(t/T), q_T = softmax(s/T).

    Shapes ``[..., V]``; the teacher is treated as a constant (no gradient).
    Teacher logits of −inf (zero probability) are allowed: 0·log 0 = 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                         "logits differ in shape")
    with torch.no_grad():
        logp = _tempered_log_probs(teacher_logits.detach(), temperature)
        neg_entropy = _xlogx_from_log(logp).sum(-1)
        p = logp.exp_()  # reuse the buffer: logp is no longer needed
    logq = _tempered_log_probs(student_logits, temperature)
    cross = (p * logq).sum(-1)  # Σ p log q
    return temperature ** 2 * _masked_token_mean(neg_entropy - cross, token_mask)


def kd_combine(ce: torch.Tensor, kl: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·KL + (1−α)·CE (the paper uses α = 0.67 for small models)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return alpha * kl + (1.0 - alpha) * ce


# ----------------------------------------------------------------------------- targets (cache stage)

@torch.no_grad()
def topk_targets(teacher_logits: torch.Tensor, k: int, temperature: float,
                 logp_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Top-k tempered teacher log-probs + the log of the remaining mass.

    Returns ``logp`` [..., k] (``logp_dtype``, fp16 by default), ``idx`` [..., k]
    int32 and ``rest`` [...] float32 = log Σ_{v ∉ top-k} p_v, computed as a
    logsumexp over the complement (exact even when the rest is ~1e-30; −inf
    when k = V). 6k + 4 bytes per token.
    """
    _check_vocab_k(k, teacher_logits.shape[-1], "k")
    logp = _tempered_log_probs(teacher_logits, temperature)
    top, idx = torch.topk(logp, k, dim=-1)
    rest = _complement_logsumexp(logp, idx)
    return {"logp": top.to(logp_dtype), "idx": idx.to(torch.int32), "rest": rest}


def _unique_counts(draws: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``draws`` [N, S]: unique ids and their counts, left-packed into [N, size], padded with count 0."""
    srt, _ = torch.sort(draws, dim=-1)
    new_run = torch.ones_like(srt, dtype=torch.bool)
    new_run[:, 1:] = srt[:, 1:] != srt[:, :-1]
    slot = new_run.long().cumsum(-1) - 1  # run number of each draw
    counts = torch.zeros(srt.shape[0], size, dtype=torch.long, device=srt.device)
    counts.scatter_add_(1, slot, torch.ones_like(srt))
    ids = torch.zeros(srt.shape[0], size, dtype=srt.dtype, device=srt.device)
    ids.scatter_(1, slot, srt)  # every draw of a run writes the same id
    return ids, counts


@torch.no_grad()
def sampled_targets(teacher_logits: torch.Tensor, samples: int, temperature: float,
                    generator: torch.Generator | None = None, head_k: int = 0,
                    logp_dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Token ids sampled from the tempered teacher, stored as unique ids + counts.

    ``head_k = 0``: ``samples`` draws (with replacement) from p_T. ``head_k > 0``:
    the exact top-``head_k`` head (``head_logp``, ``head_idx`` as in
    :func:`topk_targets`) and the draws come from the tail only (p_T with the
    head zeroed, renormalised); ``tail_mass`` = Σ_{tail} p_T (float32) weights
    them in the loss. Rows with no tail mass get count 0 everywhere.

    Always: ``ids`` [..., S] int32 and ``counts`` [..., S] int16 (padded with
    count 0; S = ``samples``), ``ent`` [...] float32 = H(p_T) so the loss can
    report an unbiased KL value. Deterministic given ``generator`` (which must
    live on the logits' device). Bytes per token: 6S + 4, plus 6k + 4 with a head.
    """
    vocab = teacher_logits.shape[-1]
    if not 0 < samples <= torch.iinfo(torch.int16).max:
        raise ValueError(f"samples must be in [1, 32767] (int16 counts), got {samples}")
    lead = teacher_logits.shape[:-1]
    logp = _tempered_log_probs(teacher_logits, temperature).reshape(-1, vocab)
    out: dict[str, torch.Tensor] = {"ent": -_xlogx_from_log(logp).sum(-1).reshape(lead)}
    has_tail = None
    if head_k > 0:
        _check_vocab_k(head_k, vocab, "head_k")
        head, head_idx = torch.topk(logp, head_k, dim=-1)
        out["head_logp"] = head.to(logp_dtype).reshape(*lead, head_k)
        out["head_idx"] = head_idx.to(torch.int32).reshape(*lead, head_k)
        out["tail_mass"] = _complement_logsumexp(logp, head_idx).exp().reshape(lead)  # head set to -inf
        probs = logp.exp_()  # the tail distribution, unnormalised (multinomial normalises)
        has_tail = probs.sum(-1) > 0
        probs[~has_tail] = 1.0  # any valid distribution; its counts are zeroed below
    else:
        probs = logp.exp_()
    draws = torch.multinomial(probs, samples, replacement=True, generator=generator)
    ids, counts = _unique_counts(draws, samples)
    if has_tail is not None:
        counts = counts * has_tail.unsqueeze(-1)
    out["ids"] = ids.to(torch.int32).reshape(*lead, samples)
    out["counts"] = counts.to(torch.int16).reshape(*lead, samples)
    return out


def make_targets(teacher_logits: torch.Tensor, fmt: str, k: int = 64, samples: int = 256,
                 temperature: float = 2.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Build the cache targets of format ``fmt`` ("topk": k; "sampled": samples; "head+sampled": both)."""
    if fmt == "topk":
        return topk_targets(teacher_logits, k, temperature)
    if fmt == "sampled":
        return sampled_targets(teacher_logits, samples, temperature, generator)
    if fmt == "head+sampled":
        _check_vocab_k(k, teacher_logits.shape[-1], "k (the exact head size)")
        return sampled_targets(teacher_logits, samples, temperature, generator, head_k=k)
    raise ValueError(f"unknown target format {fmt!r}; expected one of {FORMATS}")


def target_bytes_per_token(targets: dict[str, torch.Tensor]) -> float:
    """Storage bytes per token of a target dict (the per-token scalars ``rest``/``ent`` fix [B, L])."""
    token_shape = min((t.shape for t in targets.values()), key=len)
    n_tokens = max(math.prod(token_shape), 1)
    return sum(t.numel() * t.element_size() for t in targets.values()) / n_tokens


# ----------------------------------------------------------------------------- losses from targets

def kl_topk(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], temperature: float = 2.0,
            token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """T² · mean over tokens of the KL over the k cached tokens plus one "rest" bucket.

    KL = Σ_{i∈top-k} p_i (log p_i − log q_i) + p_r (log p_r − log q_r), where
    p_r = exp(rest) and q_r = 1 − Σ_{i∈top-k} q_i, computed as log1mexp of the
    logsumexp of the gathered student log-probs. Exact (value and gradient)
    when the teacher has no mass outside the top-k, and equal to
    :func:`kl_full` for k = V. q_r is floored at float32 eps (≈1.2e-7): below
    that 1 − Σq is rounding noise.
    """
    logq = _tempered_log_probs(student_logits, temperature)
    lq = logq.gather(-1, targets["idx"].long())
    lp = targets["logp"].float()
    head = _xlogx_from_log(lp).sum(-1) - (lp.exp() * lq).sum(-1)
    log_p_rest = targets["rest"].float()
    p_rest = log_p_rest.exp()
    log_q_rest = _log1mexp(torch.logsumexp(lq, dim=-1).clamp(max=-_F32_EPS))
    rest = torch.where(p_rest > 0, p_rest * log_p_rest, torch.zeros_like(p_rest)) - p_rest * log_q_rest
    return temperature ** 2 * _masked_token_mean(head + rest, token_mask)


def kl_sampled(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], temperature: float = 2.0,
               token_mask: torch.Tensor | None = None, subtract_entropy: bool = True) -> torch.Tensor:
    """T² · mean over tokens of the student's cross-entropy against the sampled teacher.

    Without a head: CE = −Σ_j (c_j / Σc) log q_j over the sampled ids. Its
    gradient w.r.t. the student logits, T·(q − c/Σc), has expectation T·(q − p):
    unbiased for the full-KL gradient. With a head (``head_idx`` in targets):
    CE = −Σ_{i∈head} p_i log q_i − tail_mass · Σ_j (c_j / Σc) log q_j with the
    draws from the renormalised tail, again unbiased (and exact on the head).

    The CE value exceeds the KL by the teacher entropy H(p), a constant for the
    student; with ``subtract_entropy`` (default) and ``ent`` in the targets it
    is subtracted, so the returned value is an unbiased estimate of the KL
    (a single draw can be negative). The gradient is the same either way.
    """
    logq = _tempered_log_probs(student_logits, temperature)
    counts = targets["counts"].float()
    weights = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
    ce = -(weights * logq.gather(-1, targets["ids"].long())).sum(-1)
    if "head_idx" in targets:
        p_head = targets["head_logp"].float().exp()
        ce_head = -(p_head * logq.gather(-1, targets["head_idx"].long())).sum(-1)
        ce = ce_head + targets["tail_mass"].float() * ce
    if subtract_entropy and "ent" in targets:
        ce = ce - targets["ent"].float()
    return temperature ** 2 * _masked_token_mean(ce, token_mask)


def kl_from_targets(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], fmt: str,
                    temperature: float = 2.0, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The distillation loss for cached targets of format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "topk":
        return kl_topk(student_logits, targets, temperature, token_mask)
    if fmt in ("sampled", "head+sampled"):
        if ("head_idx" in targets) != (fmt == "head+sampled"):
            raise ValueError(f"targets {sorted(targets)} do not match format {fmt!r}")
        return kl_sampled(student_logits, targets, temperature, token_mask)
    raise ValueError(f"unknown target format {fmt!r}; expected one of {FORMATS}")


def squarehead_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of ‖h_s − h_t‖² / ‖h_t‖² (SquareHead: MSE normalised per layer).

    The normalisation makes every layer count equally whatever its activation
    scale. The teacher states are constants. ``token_mask`` [B, L] drops padded
    positions. Off by default in the trainer (the AST paper found it hurts).
    """
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"need the same non-zero number of student ({len(student_hidden)}) "
                         f"and teacher ({len(teacher_hidden)}) hidden states")
    losses = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        if hs.shape != ht.shape:
            raise ValueError(f"hidden shapes differ: student {tuple(hs.shape)}, teacher {tuple(ht.shape)}")
        diff = (hs.float() - ht.detach().float()).pow(2).sum(-1)
        norm = ht.detach().float().pow(2).sum(-1)
        if token_mask is not None:
            diff, norm = diff * token_mask.to(diff.dtype), norm * token_mask.to(norm.dtype)
        losses.append(diff.sum() / norm.sum().clamp_min(torch.finfo(torch.float32).tiny))
    return torch.stack(losses).mean()


def logit_grad_error(student_logits: torch.Tensor, targets: dict[str, torch.Tensor], fmt: str,
                     teacher_logits: torch.Tensor, temperature: float = 2.0,
                     token_mask: torch.Tensor | None = None, per_token: bool = True) -> float:
    """Relative L2 error ‖∇_s L_cache − ∇_s KL_full‖ / ‖∇_s KL_full‖ (autograd; float64 norms).

    How far the cached target's gradient on the student logits is from the
    online teacher's; 0 means the cache is as good as the teacher. Default
    (``per_token``): each token's own ratio over its V logits, averaged over
    tokens — the measure the cache-format benchmark reports. ``per_token=False``: one ratio over
    all tokens together (what the batch gradient sees; smaller, because tokens
    with large gradients dominate it).
    """
    s_cache = student_logits.detach().float().requires_grad_(True)
    (g_cache,) = torch.autograd.grad(kl_from_targets(s_cache, targets, fmt, temperature, token_mask), s_cache)
    s_full = student_logits.detach().float().requires_grad_(True)
    (g_full,) = torch.autograd.grad(kl_full(s_full, teacher_logits, temperature, token_mask), s_full)
    if per_token:
        err = torch.linalg.vector_norm((g_cache - g_full).double(), dim=-1)
        ratio = err / torch.linalg.vector_norm(g_full.double(), dim=-1).clamp_min(1e-300)
        return float(_masked_token_mean(ratio, token_mask))
    err = torch.linalg.vector_norm((g_cache - g_full).double())
    return float(err / torch.linalg.vector_norm(g_full.double()).clamp_min(1e-300))
