"""Gathering a small picklable value from every rank through a Lightning strategy.

Lightning writes only rank 0's copy of a checkpoint, so per-rank state that must survive a resume (RNG
states, stream positions) is gathered onto every rank while the checkpoint is built.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch


def all_gather_objects(trainer: Any, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order; a collective: every rank must call it.

    Args:
        trainer: the running Trainer (its ``world_size`` and its strategy's ``all_gather`` are used); a
            single-process run returns ``[value]`` without communication.
        value: any picklable object.
    """
    if trainer.world_size == 1:
        return [value]
    strategy = trainer.strategy
    payload = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
    # all_gather needs equal shapes on every rank, and NCCL needs device tensors.
    lengths = strategy.all_gather(torch.tensor([len(payload)], device=strategy.root_device)).flatten().cpu()
    padded = torch.zeros(int(lengths.max()), dtype=torch.uint8)
    padded[: len(payload)] = payload
    gathered = strategy.all_gather(padded.to(strategy.root_device)).cpu()
    # Only this run's own ranks produced these bytes.
    return [pickle.loads(gathered[rank, : int(length)].numpy().tobytes()) for rank, length in enumerate(lengths)]
