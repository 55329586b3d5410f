"""Fully sharded training (FSDP2 ``fully_shard``) for students too large to replicate.

Why FSDP2 and what stays the same: under DDP every rank holds the whole
model, optimizer state and masks. A 7B student with AdamW state does not fit
one 80 GB GPU that way, so with ``train.parallel: fsdp`` every transformer
block's parameters (and the optimizer state that follows them) are sharded by
rows across the ranks and all-gathered only around each block's forward and
backward. The algorithm does not change:

- **Masks** stay whole on every rank (a bool buffer is 1/32 of the fp32
  weight; FSDP leaves buffers alone). The forward multiplies the gathered
  weight by it as before.
- **The SR-STE decay** in :class:`~ast_core.optim.ASTAdamW` runs on each
  rank's row shard with the matching rows of the mask: N:M groups run along
  a row (the input dimension), so a row shard holds whole groups.
- **Mask refresh** gathers one layer's weight at a time on every rank and
  computes the same mask everywhere; the cross-rank checksum still verifies it.
- **Checkpoints** are full (unsharded) state dicts, gathered on every rank and
  written by rank 0: the same files a single process writes, so a run can
  resume at another world size, and export/eval need no FSDP.

Nothing here runs unless ``torch.distributed`` is initialised with world size
> 1; one-process training never touches DTensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .sparse import block_container
from .errors import ASTError

try:  # torch builds without distributed support have no DTensor: nothing can be sharded there
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - every supported build has it
    DTensor = None  # type: ignore[assignment,misc]


class ShardingError(ASTError, RuntimeError):
    """A sharded tensor laid out in a way this code does not handle."""


def is_sharded(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model`: callers ask the model, not the config."""
    return any(is_sharded(p) for p in model.parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank when sharded (a collective: every rank
    must call it in the same order), else ``t`` itself."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (a view: in-place updates reach the sharded tensor), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def local_rows(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The rows of ``whole`` (shaped like ``p``'s global shape) that this rank's shard of
    ``p`` holds, as a view. FSDP2 splits dim 0 as ``torch.chunk`` does: ceil(rows/world)
    rows per rank, the last ranks holding fewer (or none)."""
    if not is_sharded(p):
        return whole
    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ShardingError(f"expected a parameter sharded on dim 0 over a 1-D mesh, got {p.placements}")
    rows = p.shape[0]
    chunk = math.ceil(rows / p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * chunk, rows)
    n = p.to_local().shape[0]
    if start + n > rows:
        raise ShardingError(f"shard of {n} rows at offset {start} overruns {rows} rows")
    return whole.narrow(0, start, n)


def shard_model(model: nn.Module, device: torch.device) -> None:
    """``fully_shard`` every transformer block, then the root (embeddings, head, norms).

    Must run before the optimizer is built: sharding replaces the parameters.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed as dist

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    _, blocks = block_container(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``like`` (a DTensor: this rank keeps its slice, no
    communication, since every rank holds ``whole``); a plain ``like`` gets ``whole``."""
    if not is_sharded(like):
        return whole
    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (collective):
    the layout a single process saves."""
    sd = optimizer.state_dict()
    sd["state"] = {idx: {k: full(v) for k, v in st.items()} for idx, st in sd["state"].items()}
    return sd


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer state dict (from :func:`full_optimizer_state` or one process)
    split to this rank's shards, ready for ``optimizer.load_state_dict``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = dict(state)
    out["state"] = {}
    for idx, st in state["state"].items():
        p = params[int(idx)]
        out["state"][idx] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                             for k, v in st.items()}
    return out


def shard_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full checkpoint tensors laid out like ``model.state_dict()`` (sharded where it is)."""
    sd = model.state_dict()
    return {k: shard_like(v, sd[k]) if k in sd else v for k, v in tensors.items()}
