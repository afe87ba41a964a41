"""Collectives over the default ``torch.distributed`` process group, for code that runs inside a training
process group without owning it (the lm-eval model's data-parallel evaluation)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def default_group_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_tensor(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` (equal shapes on all ranks) stacked (0-d) or concatenated along dim 0."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.stack(gathered) if tensor.dim() == 0 else torch.cat(gathered)


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's picklable ``value``, in rank order, on every rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Waits until every rank of the default process group reaches it."""
    dist.barrier()
