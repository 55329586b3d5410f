"""Calibration statistics and block-by-block replay of a transformer.

Two things one-shot pruning and the AST initial mask need from calibration text:

- :func:`collect_act_sq_mean` — for every sparse linear, the per-input-feature
  mean of ``x_j²`` over all calibration tokens, accumulated streaming by forward
  hooks (the activations themselves are never stored). It is the activation
  half of the Wanda score ``|W_ij| · sqrt(mean x_j²)``.
- :func:`collect_group_cross` — for every sparse linear, ``E[x zᵀ]`` with ``z``
  the sums of ``x`` over groups of ``k`` columns: all a least-squares SLoRB
  initialisation needs (``ast_core.slorb``), at ``1/k`` of a full Gram matrix.
- :func:`capture_block_inputs` / :func:`run_block` — the inputs of transformer
  block 0 (hidden states plus every extra argument the block is called with:
  attention mask, position ids, rotary ``(cos, sin)`` …), captured by a forward
  pre-hook that stops the forward right there, so the blocks can then be run
  one at a time. Sequential pruning needs this: block ``i`` must see the
  outputs of the already-pruned blocks ``< i``, and only one block's statistics
  (e.g. Hessians) are held at any time.

Calibration batches are ``input_ids`` tensors ``[batch, seq]`` (or mappings
with ``input_ids`` and optionally ``attention_mask``) of unpadded token blocks:
every position counts as a calibration token.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .sparse import SparseLinear, block_container

Batch = torch.Tensor | Mapping[str, torch.Tensor]


class _StopForward(Exception):
    """Raised by the capture hook to end the model forward at block 0."""


def model_device(model: nn.Module) -> torch.device:
    """Where the model's input embeddings live (calibration batches are moved there)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def _model_inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        ids = batch if batch.dim() == 2 else batch.unsqueeze(0)
        return {"input_ids": ids.to(device)}
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "input_ids" not in inputs:
        raise ValueError(f"calibration batch mapping needs 'input_ids', got keys {sorted(inputs)}")
    return inputs


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """A layer input ``[..., in_features]`` as float32 ``[tokens, in_features]``."""
    return x.detach().reshape(-1, x.shape[-1]).float()


class SquareSum:
    """Forward hook: streaming Σ_t x_tj² and token count for one layer input (float64 running sums)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = flat_tokens(args[0])
        self.sum += x.pow(2).sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return (self.sum / self.tokens).float()


@contextmanager
def masks_ignored(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Run the given sparse layers dense (``dense_mode``) inside the block, restoring it after.

    Statistics for pruning describe the layer before it is pruned, whatever
    mask it may already carry.
    """
    sparse = [layer for layer in layers if isinstance(layer, SparseLinear)]
    saved = [layer.dense_mode for layer in sparse]
    for layer in sparse:
        layer.dense_mode = True
    try:
        yield
    finally:
        for layer, mode in zip(sparse, saved):
            layer.dense_mode = mode


def _resolve_layers(model: nn.Module, layer_names: list[str] | None) -> dict[str, nn.Module]:
    if layer_names is None:
        layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, SparseLinear)}
        if not layers:
            raise ValueError(f"{type(model).__name__} has no SparseLinear layers; call ast_core.sparse.sparsify "
                             "first or pass layer_names")
        return layers
    return {name: model.get_submodule(name) for name in layer_names}


def _in_features(layer: nn.Module) -> int:
    if hasattr(layer, "in_features"):
        return int(layer.in_features)
    return int(layer.weight.shape[-1])


class GroupCross:
    """Forward hook: streaming Σ_t x_t z_tᵀ (z = group sums of x over ``k`` columns) and token count."""

    def __init__(self, in_features: int, group_size: int, device: torch.device) -> None:
        self.group_size = group_size
        self.sum = torch.zeros(in_features, in_features // group_size, dtype=torch.float64, device=device)
        self.tokens = 0

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        x = flat_tokens(args[0])
        z = x.unflatten(-1, (x.shape[-1] // self.group_size, self.group_size)).sum(-1)
        self.sum += (x.T @ z).double()
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return (self.sum / self.tokens).float()


def _collect(model: nn.Module, batches: Iterable[Batch], layers: dict[str, nn.Module],
             hooks: dict[str, Any]) -> None:
    """One calibration pass with ``hooks[name]`` on ``layers[name]``: eval, no_grad, masks ignored."""
    device = model_device(model)
    handles = [mod.register_forward_hook(hooks[name]) for name, mod in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), masks_ignored(layers.values()):
            for batch in batches:
                model(**_model_inputs(batch, device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def collect_act_sq_mean(model: nn.Module, batches: Iterable[Batch],
                        layer_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{layer: mean over calibration tokens of x_j²}`` (float32, shape ``[in_features]``).

    Computed as running float64 sums Σ_t x_tj² / T by forward hooks, so memory
    is O(Σ in_features) whatever the number of tokens. The model runs in eval
    mode under ``no_grad`` with masks ignored (the statistic describes the dense
    model, which is what the Wanda initial mask is computed from); training
    mode and ``dense_mode`` are restored afterwards.
    """
    layers = _resolve_layers(model, layer_names)
    sums = {name: SquareSum(_in_features(mod), mod.weight.device) for name, mod in layers.items()}
    _collect(model, batches, layers, sums)
    return {name: s.mean() for name, s in sums.items()}


def collect_group_cross(model: nn.Module, batches: Iterable[Batch], group_size: int,
                        layer_names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{layer: E[x zᵀ]}`` (float32, ``[in_features, in_features / group_size]``), z = group sums of x.

    Same pass conventions as :func:`collect_act_sq_mean` (dense model, float64
    running sums). ``E[z zᵀ]`` is its group-summed rows, so one statistic gives
    both sides of the SLoRB least-squares problem.
    """
    layers = _resolve_layers(model, layer_names)
    bad = [f"{name} (in_features={_in_features(mod)})" for name, mod in layers.items()
           if group_size < 1 or _in_features(mod) % group_size]
    if bad:
        raise ValueError(f"SLoRB group size {group_size} does not divide in_features of: {', '.join(bad)}")
    sums = {name: GroupCross(_in_features(mod), group_size, mod.weight.device) for name, mod in layers.items()}
    _collect(model, batches, layers, sums)
    return {name: s.mean() for name, s in sums.items()}


@dataclass
class BlockCall:
    """One captured call of a transformer block: the hidden states and everything else it was given.

    ``args`` are the positional arguments after the hidden states (GPT-2 passes
    the cache and attention mask positionally), ``kwargs`` the keyword ones
    (LLaMA: ``attention_mask``, ``position_ids``, ``position_embeddings`` …).
    ``hidden_kw`` is set when the hidden states were passed by keyword.
    """
    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    hidden_kw: str | None = None

    def __call__(self, block: nn.Module) -> torch.Tensor:
        if self.hidden_kw is not None:
            out = block(*self.args, **{**self.kwargs, self.hidden_kw: self.hidden})
        else:
            out = block(self.hidden, *self.args, **self.kwargs)
        # transformers 5 decoder layers return a tensor; older ones a tuple (hidden, ...)
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Iterable[Batch]) -> list[BlockCall]:
    """The inputs of transformer block 0, one :class:`BlockCall` per calibration batch.

    A forward pre-hook (``with_kwargs=True``) on block 0 records its arguments
    and raises a private exception, so nothing past the embeddings runs. The
    model is called with ``use_cache=False`` (no KV cache is threaded between
    blocks, so replaying them independently is exact).
    """
    _, blocks = block_container(model)
    device = model_device(model)
    calls: list[BlockCall] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            calls.append(BlockCall(args[0], tuple(args[1:]), dict(kwargs)))
        else:
            kw = dict(kwargs)
            calls.append(BlockCall(kw.pop("hidden_states"), (), kw, hidden_kw="hidden_states"))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            try:
                model(**_model_inputs(batch, device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires when block 0 runs
                raise RuntimeError("block 0 was never called; cannot capture its inputs")
    finally:
        handle.remove()
        model.train(was_training)
    if not calls:
        raise ValueError("no calibration batches were given")
    return calls


@torch.no_grad()
def run_block(block: nn.Module, calls: list[BlockCall]) -> list[BlockCall]:
    """Run one block on every captured call; return the calls for the next block.

    The next block receives this block's output as hidden states and the same
    extra arguments (mask, positions and rotary embeddings are shared by all
    blocks of these architectures).
    """
    return [replace(call, hidden=call(block)) for call in calls]


@torch.no_grad()
def run_blocks(model: nn.Module, calls: list[BlockCall], start: int = 0,
               stop: int | None = None) -> list[BlockCall]:
    """Run blocks ``start .. stop-1`` one at a time; return the inputs of block ``stop``.

    With the defaults this is the whole block stack, so ``calls[k].hidden``
    afterwards equals the last block's output of the full forward (before the
    final norm).
    """
    _, blocks = block_container(model)
    for block in blocks[start:stop]:
        calls = run_block(block, calls)
    return calls
