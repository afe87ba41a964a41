"""The per-rank checkpoint files of an expert-parallel run: where each rank's shard lives and its layout record.

:class:`~sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy` writes them;
:mod:`sdmoe_train.checkpointing.consolidate` joins them into one file.
"""

from __future__ import annotations

from pathlib import Path

LAYOUT_KEY = "sdmoe_train_layout"
"""Checkpoint entry recording the parallel layout a rank file was written with."""


def rank_file(directory: str | Path, global_rank: int) -> Path:
    """The file of one rank inside a checkpoint directory."""
    return Path(directory) / f"rank_{global_rank:05d}.pt"
