"""Distributed training: expert parallelism (all-to-all dispatch, expert sharding) and DeepSpeed ZeRO.

The only package that imports ``torch.distributed`` or ``deepspeed``; model code never asks for its rank.
"""

from sdmoe_train.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
