"""Sparse linear layers and swapping them into a transformers model.

A :class:`SparseLinear` keeps the dense weight ``W`` as the trainable parameter
and the N:M mask ``m`` as a registered buffer (so it is saved in the
state_dict). Forward uses ``W ⊙ m``; backward passes the gradient straight
through to the dense ``W`` (STE), which is what lets a pruned weight grow back
and the mask adapt. An optional ``side`` module (SLoRB) adds its output.

GPT-2 stores its projections as ``Conv1D`` with weight ``[in, out]``; the swap
transposes them into the ``[out, in]`` layout once, and remembers it so the
export can write them back in the original layout.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from .errors import ASTError

try:  # GPT-2 style layers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


class _MaskedWeightSTE(torch.autograd.Function):
    """y = W ⊙ m forward; dL/dW = dL/d(W ⊙ m) backward (straight-through)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, None


def masked_weight_ste(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # bool -> float through uint8 is several times faster than a direct bool cast on CPU
    return _MaskedWeightSTE.apply(weight, mask.view(torch.uint8).to(weight.dtype))


class SparseLinear(nn.Module):
    """``nn.Linear`` whose effective weight is ``W ⊙ mask`` (STE gradient to ``W``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, n: int = 2, m: int = 4,
                 from_conv1d: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n, self.m = n, m
        self.from_conv1d = from_conv1d
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.dense_mode = False  # True: ignore the mask (teacher / dense comparisons)
        self.side: nn.Module | None = None  # SLoRB branch, set by ast_core.slorb

    @classmethod
    def from_module(cls, module: nn.Module, n: int = 2, m: int = 4) -> "SparseLinear":
        if isinstance(module, nn.Linear):
            weight, conv = module.weight.data, False
        elif Conv1D and isinstance(module, Conv1D):
            weight, conv = module.weight.data.t(), True
        else:
            raise TypeError(f"cannot sparsify {type(module).__name__}")
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=module.bias is not None, n=n, m=m, from_conv1d=conv,
                    device=weight.device, dtype=weight.dtype)
        layer.weight.data.copy_(weight)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.data)
        return layer

    def effective_weight(self) -> torch.Tensor:
        """The weight the forward pass uses (no autograd graph)."""
        w = self.weight.detach()
        return w if self.dense_mode else w * self.mask.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.dense_mode else masked_weight_ste(self.weight, self.mask)
        y = F.linear(x, w, self.bias)
        if self.side is not None and not self.dense_mode:
            y = y + self.side(x)
        return y

    def set_mask(self, mask: torch.Tensor) -> None:
        if mask.shape != self.mask.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.mask.shape)}")
        self.mask.copy_(mask.to(torch.bool))

    def to_dense_module(self) -> nn.Module:
        """A plain ``nn.Linear`` / ``Conv1D`` holding ``W ⊙ m`` (the export hand-off)."""
        w = self.effective_weight()
        if self.from_conv1d:
            mod = Conv1D(self.out_features, self.in_features)
            mod.weight.data = w.t().contiguous().clone()
        else:
            mod = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                            device=w.device, dtype=w.dtype)
            mod.weight.data.copy_(w)
        if self.bias is not None:
            mod.bias.data = self.bias.detach().clone()
        return mod

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.n}:{self.m}, dense_mode={self.dense_mode}")


class SparsityError(ASTError, ValueError):
    """A model that cannot be sparsified as asked; the message names the layers."""


def block_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer block list: the largest ``nn.ModuleList`` in the model."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and (best is None or len(mod) > len(best[1])):
            best = (name, mod)
    if best is None:
        raise SparsityError(f"{type(model).__name__}: no transformer block list (nn.ModuleList) found")
    return best


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or bool(Conv1D and isinstance(mod, Conv1D))


def find_target_linears(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the linears inside the transformer blocks, minus ``exclude`` regexes."""
    prefix, _ = block_container(model)
    patterns = [re.compile(p) for p in exclude]
    names = [name for name, mod in model.named_modules()
             if name.startswith(prefix + ".") and _is_linear(mod) and not isinstance(mod, SparseLinear)
             and not any(p.search(name) for p in patterns)]
    if not names:
        raise SparsityError(f"{type(model).__name__}: no linear layers found inside {prefix!r}")
    return names


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def sparsify(model: nn.Module, n: int = 2, m: int = 4, exclude: Iterable[str] = ()) -> list[str]:
    """Replace every target linear with a :class:`SparseLinear` (mask all-ones).

    Refuses, before changing anything, layers whose ``in_features`` is not a
    multiple of ``m``; list them in ``exclude`` to keep them dense.
    """
    names = find_target_linears(model, exclude)
    bad = []
    for name in names:
        mod = model.get_submodule(name)
        in_f = mod.weight.shape[0] if (Conv1D and isinstance(mod, Conv1D)) else mod.in_features
        if in_f % m:
            bad.append(f"{name} (in_features={in_f})")
    if bad:
        raise SparsityError(f"in_features not divisible by M={m}: {', '.join(bad)}; "
                            "exclude these layers by pattern to keep them dense")
    for name in names:
        _set_submodule(model, name, SparseLinear.from_module(model.get_submodule(name), n, m))
    return names


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            yield name, mod


def set_dense_mode(model: nn.Module, dense: bool) -> None:
    for _, layer in sparse_layers(model):
        layer.dense_mode = dense


def densify(model: nn.Module) -> list[str]:
    """Swap every :class:`SparseLinear` back for a plain layer holding ``W ⊙ m``.

    Refuses a model with SLoRB branches: folding them in is not exact, so the
    caller must decide (see ``ast_core.export``).
    """
    names = []
    for name, layer in list(sparse_layers(model)):
        if layer.side is not None:
            raise SparsityError(f"{name} has a SLoRB side branch; it cannot be folded into a 2:4 weight")
        _set_submodule(model, name, layer.to_dense_module())
        names.append(name)
    return names
