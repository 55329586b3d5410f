"""One-shot N:M baselines: magnitude, Wanda and SparseGPT, behind one interface.

Every method works on a model already passed through
:func:`ast_core.sparse.sparsify` and hands back the same representation the
AST trainer uses: each :class:`~ast_core.sparse.SparseLinear` gets an exact N:M
``mask`` (2:4 by default, taken from the layer), its ``dense_mode`` is switched
off, and ``W ⊙ m`` is what the forward computes. Magnitude and Wanda only set
masks; SparseGPT also rewrites ``weight`` with its OBS-reconstructed values.

The calibration methods run sequentially, block by block (SparseGPT and Wanda
papers): the statistics of block ``i`` are measured on the outputs of the
already-pruned blocks ``< i`` with block ``i`` itself dense, then block ``i`` is
pruned and its pruned output feeds block ``i+1``. Only one block's statistics
(for SparseGPT its layers' Hessians) are in memory at a time.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .calibration import (Batch, SquareSum, capture_block_inputs, collect_act_sq_mean, flat_tokens,
                          masks_ignored, run_block)
from .masks import magnitude_score, mask_is_exact, nm_mask, wanda_score
from .sparse import SparseLinear, block_container, sparse_layers

METHODS = ("magnitude", "wanda", "sparsegpt")


def _layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    layers = list(sparse_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no SparseLinear layers; "
                         "call ast_core.sparse.sparsify(model) before one-shot pruning")
    return layers


def _apply_mask(layer: SparseLinear, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """Install the pruning result: optional new weight, the mask, masked forward on."""
    if weight is not None:
        layer.weight.data.copy_(weight.to(layer.weight.dtype))
    layer.set_mask(mask)
    layer.dense_mode = False


# --------------------------------------------------------------------------- magnitude

@torch.no_grad()
def prune_magnitude(model: nn.Module) -> list[str]:
    """m = nm_mask(|W|): keep the N largest-magnitude weights of every group of M inputs."""
    names = []
    for name, layer in _layers(model):
        _apply_mask(layer, nm_mask(magnitude_score(layer.weight), layer.n, layer.m))
        names.append(name)
    return names


# --------------------------------------------------------------------------- block-by-block driver

class _GramSum:
    """Streaming Σ_t x_t x_tᵀ (float64) of one layer's inputs, and the token count.

    Layers fed the very same tensor (q/k/v, gate/up) share the float32 product
    of the most recent input through ``shared``, so it is computed once.
    """

    def __init__(self, layer: SparseLinear, shared: dict[str, Any]) -> None:
        self.sum = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64,
                               device=layer.weight.device)
        self.tokens = 0
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = args[0]
        if self.shared.get("input") is not x:
            flat = flat_tokens(x)
            self.shared.update(input=x, gram=flat.t() @ flat, tokens=flat.shape[0])
        self.sum += self.shared["gram"]
        self.tokens += self.shared["tokens"]

    def hessian(self) -> torch.Tensor:
        """H = 2·XᵀX / T (the Hessian of the layer-wise loss ‖XWᵀ − XŴᵀ‖² / T per row)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.sum.mul_(2.0 / self.tokens)


StatFactory = Callable[[SparseLinear, dict[str, Any]], Callable]
Pruner = Callable[[SparseLinear, Any], None]


@torch.no_grad()
def _prune_block_by_block(model: nn.Module, calib_batches: Iterable[Batch], new_stat: StatFactory,
                          prune: Pruner) -> list[str]:
    """Sequential pruning: per block, measure (block dense) → prune → run to get next inputs."""
    prefix, blocks = block_container(model)
    outside = [name for name, _ in _layers(model) if not name.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"sequential pruning covers the transformer blocks ({prefix}) only; "
                         f"sparse layers outside them: {', '.join(outside[:5])}")
    calls = capture_block_inputs(model, calib_batches)
    names: list[str] = []
    for i, block in enumerate(blocks):
        layers = [(f"{prefix}.{i}.{n}", l) for n, l in block.named_modules() if isinstance(l, SparseLinear)]
        if layers:
            shared: dict[str, Any] = {}
            stats = {name: new_stat(layer, shared) for name, layer in layers}
            handles = [layer.register_forward_hook(stats[name]) for name, layer in layers]
            try:
                with masks_ignored(layer for _, layer in layers):
                    for call in calls:
                        call(block)
            finally:
                for h in handles:
                    h.remove()
                shared.clear()
            for name, layer in layers:
                prune(layer, stats.pop(name))
                names.append(name)
            del stats
        if i + 1 < len(blocks):
            calls = run_block(block, calls)
    return names


# --------------------------------------------------------------------------- Wanda

@torch.no_grad()
def prune_wanda(model: nn.Module, calib_batches: Iterable[Batch], sequential: bool = True) -> list[str]:
    """m = nm_mask(|W_ij| · sqrt(mean_t x_tj²)) (Sun et al. 2023), weights unchanged.

    ``sequential=True`` measures each block's activations on the outputs of
    the already-pruned blocks before it; ``False`` measures every layer once on
    the dense model (:func:`~ast_core.calibration.collect_act_sq_mean`), which
    is how the AST initial mask is computed.
    """
    def prune(layer: SparseLinear, stat: SquareSum) -> None:
        _apply_mask(layer, nm_mask(wanda_score(layer.weight, stat.mean()), layer.n, layer.m))

    if sequential:
        return _prune_block_by_block(model, calib_batches,
                                     lambda layer, shared: SquareSum(layer.in_features, layer.weight.device),
                                     prune)
    act = collect_act_sq_mean(model, calib_batches)
    layers = dict(_layers(model))
    for name, layer in layers.items():
        _apply_mask(layer, nm_mask(wanda_score(layer.weight, act[name]), layer.n, layer.m))
    return list(layers)


# --------------------------------------------------------------------------- SparseGPT

def inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, U ᵀU = (H + λI)⁻¹, λ = percdamp · mean(diag H).

    Row j of U holds the OBS update direction for column j once columns < j are
    fixed, and U_jj² is [H⁻¹]_jj of the remaining columns (SparseGPT §3). If the
    damped H is still not positive definite, λ is raised tenfold (up to 5 times).
    """
    h = hessian.to(torch.float64)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = percdamp * float(torch.diagonal(h).mean())
    damp = damp if damp > 0 else 1e-8
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return upper
        damp *= 10.0
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after damping ×1e5")


@torch.no_grad()
def sparsegpt_nm(weight: torch.Tensor, hessian: torch.Tensor, n: int = 2, m: int = 4, blocksize: int = 128,
                 percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (Frantar & Alistarh 2023, Alg. 1): returns ``(reconstructed W, keep mask)``.

    Minimises ‖XWᵀ − X(W'⊙m)ᵀ‖² row by row given H = 2XᵀX/T. With U the upper
    Cholesky factor of H⁻¹, columns are fixed left to right; at the start of each
    group of M columns the M−N with the smallest w_j²/U_jj² are pruned (scores on
    the current, already-updated weights). A pruned column j leaves the error
    e_j = w_j / U_jj, which the OBS update W[:, k] −= e_j U_jk spreads over the
    later columns k: inside the ``blocksize`` block at once, to later blocks
    lazily (one matmul per block). Dead inputs (H_jj = 0) get H_jj = 1, W_j = 0.

    Vectorised over rows and over the columns of a group: with the group's pruned
    columns a₁ < a₂ < … of a row, e_{a_p} = (w_{a_p} − Σ_{q<p} e_{a_q} U_{a_q a_p}) / U_{a_p a_p}
    (a loop over the M−N pruned slots, not over columns); kept columns receive
    the same updates. Only the groups run in order, as the method requires.
    """
    if blocksize % m:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={m}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={cols}")
    w = weight.detach().float().clone()
    h = hessian.detach().to(torch.float64, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_cholesky(h, percdamp).to(torch.float32)
    del h
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    slot_order = torch.arange(m, device=w.device)
    row_idx = torch.arange(rows, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2].contiguous()
        err1 = torch.zeros_like(w1)
        for g in range(0, i2 - i1, m):
            grp = slice(g, g + m)
            ug = u1[grp, grp]
            d = torch.diagonal(ug)
            k = nm_mask(w1[:, grp].pow(2) / d.pow(2), n, m)
            # pruned slots of each row in ascending column order
            pruned = torch.argsort(k.to(torch.int64) * m + slot_order, dim=1)[:, : m - n]
            e = torch.zeros(rows, m, dtype=w.dtype, device=w.device)
            for p in range(m - n):
                a_p = pruned[:, p]
                r = w1[:, g:g + m][row_idx, a_p]
                for q in range(p):
                    a_q = pruned[:, q]
                    r = r - e[row_idx, a_q] * ug[a_q, a_p]
                e[row_idx, a_p] = r / d[a_p]
            w1[:, g:] -= e @ u1[grp, g:]
            w1[:, grp] *= k  # pruned entries are now ~0; make them exactly 0
            err1[:, grp] = e
            keep[:, i1 + g:i1 + g + m] = k
        w[:, i1:i2] = w1
        if i2 < cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.to(weight.dtype), keep


@torch.no_grad()
def prune_sparsegpt(model: nn.Module, calib_batches: Iterable[Batch], blocksize: int = 128,
                    percdamp: float = 0.01) -> list[str]:
    """SparseGPT N:M on every sparse layer, block by block; weights rewritten, masks set.

    Per block the layer Hessians H = 2XᵀX/T are accumulated streaming in
    float64 on the inputs the block receives from the pruned blocks before it;
    each is freed as soon as its layer is pruned.
    """
    def prune(layer: SparseLinear, stat: _GramSum) -> None:
        new_w, mask = sparsegpt_nm(layer.weight, stat.hessian(), layer.n, layer.m, blocksize, percdamp)
        _apply_mask(layer, mask, new_w)

    return _prune_block_by_block(model, calib_batches, _GramSum, prune)


# --------------------------------------------------------------------------- one interface

def oneshot_prune(model: nn.Module, method: str, calib_batches: Iterable[Batch] | None = None,
                  **kw: Any) -> dict[str, Any]:
    """Prune a sparsified model in one shot with ``method`` ∈ {magnitude, wanda, sparsegpt}.

    Returns ``{"oneshot_method", "layers_pruned", "oneshot_seconds"}`` (keys that
    do not clash with a caller's own run info). Afterwards every sparse layer's
    mask is exactly N:M (checked here: a violation is a bug, so it raises).
    """
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "magnitude" and calib_batches is None:
        raise ValueError(f"one-shot {method} needs calibration batches (calib_batches)")
    start = time.perf_counter()
    if method == "magnitude":
        if kw:
            raise TypeError(f"prune_magnitude takes no options, got {sorted(kw)}")
        names = prune_magnitude(model)
    elif method == "wanda":
        names = prune_wanda(model, calib_batches, **kw)
    else:
        names = prune_sparsegpt(model, calib_batches, **kw)
    seconds = time.perf_counter() - start
    bad = [name for name, layer in _layers(model) if not mask_is_exact(layer.mask, layer.n, layer.m)]
    if bad:
        raise RuntimeError(f"{method} left non-exact N:M masks in {len(bad)} layers: {', '.join(bad[:5])}")
    return {"oneshot_method": method, "layers_pruned": len(names), "oneshot_seconds": round(seconds, 3)}
