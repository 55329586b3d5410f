"""Data-parallel training under ``torchrun``: which rank am I, which blocks are mine.

Why the loop stays single-process-shaped: under DDP every rank holds the same
weights, masks and optimizer state, sees a disjoint slice of each global batch
(``train.batch_size`` is the *global* batch, so a preset means the same run at
any world size) and receives the all-reduced mean gradient. Mask refresh is a
pure function of the weights, so masks stay identical without being sent;
:func:`check_masks_agree` verifies that cheaply (a per-layer checksum gather).
Only rank 0 writes checkpoints, logs and metrics; all ranks read checkpoints.

Backends: gloo on CPU, NCCL on CUDA (``init``). Launch::

    torchrun --nproc_per_node=N -m tasks.cli stage train --params ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
from .errors import ASTError


class DistributedError(ASTError, RuntimeError):
    """A distributed setting that cannot work (batch not divisible, ranks out of step)."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job; ``DistEnv()`` is the single-process case."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistEnv":
        """Read torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (absent: one process)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError as exc:
            raise DistributedError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({exc})") from None
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"rank {rank} is not in a world of size {world}")
        return cls(rank, world, local)

    def device(self, want: str = "auto") -> torch.device:
        """cuda:LOCAL_RANK when CUDA is wanted/available, else CPU."""
        if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise DistributedError("train.device is 'cuda' but no CUDA device is visible")
        return torch.device("cuda", self.local_rank % torch.cuda.device_count())


def init(env: DistEnv, device: torch.device) -> None:
    """Join the process group (once): NCCL for CUDA, gloo for CPU."""
    if not env.enabled or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def local_batch(global_batch: int, env: DistEnv) -> int:
    """Each rank's share of the global batch; the batch must split evenly (equal tokens per rank)."""
    if global_batch % env.world_size:
        raise DistributedError(f"train.batch_size ({global_batch}) is the global batch and must be divisible "
                               f"by the number of processes ({env.world_size})")
    return global_batch // env.world_size


def my_blocks(global_ids: np.ndarray, env: DistEnv) -> np.ndarray:
    """This rank's contiguous slice of the step's global block ids (disjoint across ranks)."""
    n = local_batch(len(global_ids), env)
    return global_ids[env.rank * n:(env.rank + 1) * n]


def mean_across(values: Iterable[float], env: DistEnv, device: torch.device) -> list[float]:
    """The mean over ranks of a few scalars (losses for logging, the NaN check), in one all-reduce."""
    vals = list(values)
    if not env.enabled:
        return vals
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return (t / env.world_size).tolist()


def barrier(env: DistEnv) -> None:
    if env.enabled and torch_dist.is_initialized():
        torch_dist.barrier()


def mask_checksums(masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-layer position-weighted sums of the mask: equal masks give equal checksums."""
    sums = []
    for name in sorted(masks):
        m = masks[name].reshape(-1).to(torch.float64)
        weights = torch.arange(1, m.numel() + 1, dtype=torch.float64, device=m.device) % 9973
        sums.append(torch.stack([m.sum(), (m * weights).sum()]))
    return torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)


def check_masks_agree(masks: dict[str, torch.Tensor], env: DistEnv, step: int) -> None:
    """Raise on every rank if any rank's masks differ from rank 0's (they must: same weights, same rule)."""
    if not env.enabled:
        return
    mine = mask_checksums(masks)
    ref = mine.clone()
    torch_dist.broadcast(ref, src=0)
    bad = torch.tensor([0.0 if torch.equal(mine, ref) else 1.0], dtype=torch.float64, device=mine.device)
    torch_dist.all_reduce(bad, op=torch_dist.ReduceOp.SUM)
    if bad.item():
        raise DistributedError(f"masks differ between ranks after the refresh at step {step}: the ranks' weights "
                               "have diverged (non-deterministic kernels or a rank-local change)")
