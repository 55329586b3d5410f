"""SLoRB: the Sparse Low-Rank Boosting side branch of AST-Boosted (docs/ARCHITECTURE.md, "The method").

For a sparse linear layer with weight ``W`` (N×d) and N:M mask ``m``, SLoRB
adds a cheap dense term that gives back part of what pruning removed:

    y = x·(W ⊙ m)ᵀ + (x·Xᵀ)·Sᵀ

- ``X`` ((d/k)×d) is a fixed group-sum projection, ``X[i, j] = 1`` iff column
  ``j`` belongs to group ``i`` (groups of ``k`` consecutive input columns), so
  ``x·Xᵀ`` is just the sum of ``x`` over each group;
- ``S`` (N×d/k) is trainable, initialised by default to the mean of the
  *pruned* weights of each group, ``S[i, g] = (1/k)·Σ_{p∈g} W[i, p]·(1 − m[i, p])``.

Why that init (the paper's): for an input that is constant within each group
the boosted layer then reproduces the dense layer exactly. Real inputs are not
group-constant. On SmolLM2-135M with a Wanda 2:4 mask the mean init *raises*
WikiText-2 perplexity before any training (16×512 windows: 285 → 420): S also
lands on the kept columns, and Wanda keeps the outlier channels.

So there is a second init, least squares (:func:`lstsq_S`). Given calibration
statistics ``C = E[x zᵀ]``, with ``z = x·Xᵀ`` the group sums
(``ast_core.calibration.collect_group_cross``), ``S`` minimises
``E‖(W ⊙ (1−m))·x − S·z‖²``:

    S = (W ⊙ (1−m))·C · (E[z zᵀ] + δI)⁻¹,   E[z zᵀ] = X·C,

with a small ridge ``δ`` (:data:`LSTSQ_DAMP` × the mean of diag E[z zᵀ]) for
groups that calibration never excites. S = 0 is a candidate of that problem, so
on the calibration inputs the branch can only reduce each layer's pruning error
(same model: 285 → 250; ``bench/slorb_init.py`` follows both through training).
Either init costs ``1/k`` of the dense parameters per layer (``N·d/k``).

The branch lives in ``SparseLinear.side``; ``SparseLinear.forward`` adds
``side(x)`` unless the layer is in ``dense_mode`` (the teacher / dense
comparison ignores it). Its tensors are therefore ordinary entries of the model
``state_dict`` (``"{layer}.side.S"``): attach the branch with :func:`add_slorb`
and the *same* group size before ``load_state_dict`` on a checkpoint that
contains it, or the keys are "unexpected" (and a different ``k`` is a size
mismatch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .masks import is_nm
from .sparse import SparseLinear, sparse_layers
from .errors import ASTError


LSTSQ_DAMP = 1e-2  # ridge of the least-squares init, relative to the mean diagonal of E[z zᵀ]


class SLoRBError(ASTError, ValueError):
    """A SLoRB branch that cannot be built or loaded as asked; the message names the layer."""


def group_sum_matrix(in_features: int, group_size: int, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """The 0/1 projection ``X`` ((d/k)×d) with ``X[i, j] = 1`` iff ``j // k == i``."""
    _check_divides(in_features, group_size, "layer")
    groups = torch.arange(in_features, device=device) // group_size
    return (groups.unsqueeze(0) == torch.arange(in_features // group_size, device=device).unsqueeze(1)).to(dtype)


def _check_divides(in_features: int, group_size: int, name: str) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise SLoRBError(f"{name}: SLoRB group size must be a positive integer, got {group_size!r}")
    if in_features % group_size:
        raise SLoRBError(f"{name}: SLoRB group size {group_size} does not divide in_features={in_features}")


class SLoRB(nn.Module):
    """The side branch ``x ↦ (x·Xᵀ)·Sᵀ`` of one sparse layer.

    With the default fixed projection ``X`` is never materialised: ``x·Xᵀ`` is
    the group sum ``x.unflatten(-1, (d/k, k)).sum(-1)``, which costs d FLOPs per
    token instead of d²/k and stores nothing.

    ``trainable_projection=True`` makes ``X`` a Parameter (initialised to the
    0/1 group-sum matrix). Only then is the explicit (d/k)×d matmul needed:
    once ``X`` has been updated it is no longer a 0/1 block pattern, so the
    reshape-and-sum shortcut no longer computes ``x·Xᵀ``. It adds ``d²/k``
    parameters per layer on top of ``S``.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 16,
                 trainable_projection: bool = False, device=None, dtype=None, name: str = "layer") -> None:
        super().__init__()
        _check_divides(in_features, group_size, name)
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.trainable_projection = trainable_projection
        self.S = nn.Parameter(torch.zeros(out_features, in_features // group_size, device=device, dtype=dtype))
        self.X: nn.Parameter | None = None
        if trainable_projection:
            self.X = nn.Parameter(group_sum_matrix(in_features, group_size, dtype=self.S.dtype, device=device))

    @classmethod
    def from_layer(cls, layer: SparseLinear, group_size: int = 16, trainable_projection: bool = False,
                   name: str = "layer", cross: torch.Tensor | None = None) -> "SLoRB":
        """A branch initialised from the layer's *current* weight and mask.

        Without ``cross``: ``S[i, g] = (1/k)·Σ_{p∈g} W[i, p]·(1 − m[i, p])``, the
        mean of the pruned weights of each group. With ``cross`` (this layer's
        ``E[x zᵀ]``): the least-squares fit :func:`lstsq_S`. Computed in float32,
        stored in the weight dtype. Call it after the initial mask is set: on an
        all-ones mask S is zero.
        """
        w = layer.weight.detach()
        side = cls(layer.in_features, layer.out_features, group_size, trainable_projection,
                   device=w.device, dtype=w.dtype, name=name)
        pruned = w.float() * (~layer.mask).float()
        if cross is None:
            init = pruned.unflatten(-1, (layer.in_features // group_size, group_size)).sum(-1) / group_size
        else:
            init = lstsq_S(pruned, cross.to(w.device), group_size, name=name)
        side.S.data.copy_(init.to(w.dtype))
        return side

    def group_sums(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Xᵀ`` for the fixed projection: sums of ``x`` over each group of k columns."""
        return x.unflatten(-1, (self.in_features // self.group_size, self.group_size)).sum(-1)

    def expanded(self) -> torch.Tensor:
        """``S·X`` (N×d): the dense weight the branch is equivalent to (no autograd graph)."""
        s = self.S.detach()
        if self.X is not None:
            return s @ self.X.detach()
        return s.repeat_interleave(self.group_size, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.linear(x, self.X) if self.X is not None else self.group_sums(x)
        return F.linear(g, self.S)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, trainable_projection={self.trainable_projection}")


def lstsq_S(pruned: torch.Tensor, cross: torch.Tensor, group_size: int, damp: float = LSTSQ_DAMP,
            name: str = "layer") -> torch.Tensor:
    """``argmin_S E‖pruned·x − S·z‖² + δ‖S‖²`` from ``cross = E[x zᵀ]`` (module docstring).

    ``pruned`` is ``W ⊙ (1−m)`` (N×d), ``cross`` is d×(d/k); returns S (N×d/k), float32.
    """
    d, g = pruned.shape[1], pruned.shape[1] // group_size
    if cross.shape != (d, g):
        raise SLoRBError(f"{name}: calibration statistic has shape {tuple(cross.shape)}, expected {(d, g)} "
                         f"for in_features={d} and group size {group_size}")
    cross = cross.float()
    zz = cross.unflatten(0, (g, group_size)).sum(1)  # E[z zᵀ] = X·C, g×g
    zz = 0.5 * (zz + zz.T)
    ridge = damp * zz.diagonal().mean().clamp_min(torch.finfo(torch.float32).tiny)
    zz = zz + ridge * torch.eye(g, dtype=zz.dtype, device=zz.device)
    rhs = pruned.float() @ cross  # N×g
    return torch.linalg.solve(zz, rhs.T).T  # zz symmetric: S·zz = rhs


def slorb_layers(model: nn.Module) -> list[tuple[str, SparseLinear, SLoRB]]:
    """(name, sparse layer, its SLoRB) for every sparse layer that has one."""
    return [(name, layer, layer.side) for name, layer in sparse_layers(model) if isinstance(layer.side, SLoRB)]


def check_group_size(model: nn.Module, group_size: int) -> list[tuple[str, SparseLinear]]:
    """The model's sparse layers, after checking ``group_size`` divides every ``in_features``.

    Raises :class:`SLoRBError` naming every layer it does not divide, before
    any work (the least-squares init would otherwise spend a calibration pass first).
    """
    layers = list(sparse_layers(model))
    if not layers:
        raise SLoRBError(f"{type(model).__name__} has no SparseLinear layers; sparsify it first")
    bad = [f"{name} (in_features={layer.in_features})" for name, layer in layers
           if not isinstance(group_size, int) or group_size < 1 or layer.in_features % group_size]
    if bad:
        raise SLoRBError(f"SLoRB group size {group_size!r} does not divide in_features of: {', '.join(bad)}")
    return layers


def add_slorb(model: nn.Module, group_size: int = 16, trainable_projection: bool = False,
              cross: dict[str, torch.Tensor] | None = None) -> int:
    """Attach a :class:`SLoRB` as ``side`` to every ``SparseLinear``.

    Mean-initialised, or least-squares with ``cross`` (``{layer: E[x zᵀ]}`` from
    ``ast_core.calibration.collect_group_cross`` at the same group size; every
    layer must have one). Initialised from the current masks, so set the
    initial mask first. Checks every layer before changing anything: a group
    size that does not divide a layer's ``in_features``, a layer that already
    has a side branch, or a missing statistic raises :class:`SLoRBError` naming
    the layers. Returns the number of parameters added (``Σ N·d/k``, plus
    ``Σ d²/k`` with a trainable projection).
    """
    layers = check_group_size(model, group_size)
    taken = [name for name, layer in layers if layer.side is not None]
    if taken:
        raise SLoRBError(f"layers already have a side branch: {', '.join(taken)}; call remove_slorb first")
    if cross is not None and (missing := [name for name, _ in layers if name not in cross]):
        raise SLoRBError(f"no calibration statistic for: {', '.join(missing)}")
    added = 0
    for name, layer in layers:
        layer.side = SLoRB.from_layer(layer, group_size, trainable_projection, name=name,
                                      cross=None if cross is None else cross[name])
        added += sum(p.numel() for p in layer.side.parameters())
    return added


def slorb_parameter_count(model: nn.Module) -> int:
    """Number of parameters held by the model's SLoRB branches."""
    return sum(p.numel() for _, _, side in slorb_layers(model) for p in side.parameters())


def remove_slorb(model: nn.Module) -> list[str]:
    """Detach every SLoRB branch (the layers become plain sparse layers); returns their names."""
    names = []
    for name, layer, _ in slorb_layers(model):
        layer.side = None
        names.append(name)
    return names


def slorb_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The SLoRB tensors under their ``model.state_dict()`` names (``"{layer}.side.S"``), cloned."""
    return {f"{name}.side.{key}": t.detach().clone()
            for name, _, side in slorb_layers(model) for key, t in side.state_dict().items()}


def load_slorb_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy SLoRB tensors into the branches already attached to ``model``.

    The branches must exist with the same group size and projection option
    (call :func:`add_slorb` first). Strict: a missing, unexpected or
    wrongly-shaped entry raises :class:`SLoRBError` and nothing is copied.
    """
    own = {f"{name}.side.{key}": t for name, _, side in slorb_layers(model)
           for key, t in side.state_dict().items()}
    if not own and state:
        raise SLoRBError("model has no SLoRB branches; call add_slorb(model, group_size=...) before loading")
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own.keys() & state.keys()
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise SLoRBError(f"SLoRB state does not match the attached branches (same group size needed): "
                         f"missing={missing}, unexpected={unexpected}, shape mismatches={shapes}")
    with torch.no_grad():
        for key, t in own.items():
            t.copy_(state[key])


def folded_weight(layer: SparseLinear) -> torch.Tensor:
    """``W ⊙ m + S·X``: the single dense weight equal to the boosted (sparse-mode) layer."""
    w = layer.weight.detach() * layer.mask.to(layer.weight.dtype)
    return w + layer.side.expanded().to(w.dtype) if isinstance(layer.side, SLoRB) else w


def fold_is_exact(layer: SparseLinear) -> bool:
    """True when the boosted layer can be exported as one N:M weight without error.

    Folding gives ``W ⊙ m + S·X``; ``S·X`` repeats ``S[i, g]`` over all k columns
    of group g, including the pruned slots. Any non-zero ``S[i, g]`` therefore
    fills the pruned positions of that row-group and the folded weight is dense,
    not N:M — which is why the export keeps SLoRB as a small dense side branch.
    It is exact only without a branch, or when the folded weight still happens
    to satisfy the N:M pattern (e.g. S is zero). Judged on the sparse-mode
    forward (``dense_mode`` ignores the branch and the mask alike).
    """
    if not isinstance(layer.side, SLoRB):
        return layer.side is None
    return is_nm(folded_weight(layer), layer.n, layer.m)
