"""Which checkpoint ``fit`` continues from: an explicit ``--ckpt_path`` (verified first) or the newest valid one.

Auto-resume walks the manifest of every :class:`~sdmoe_train.checkpointing.periodic.PeriodicCheckpoint`
directory from the newest entry down (:func:`~sdmoe_train.checkpointing.manifest.newest_valid_checkpoint`),
so a requeued job, or the same command run again, continues where the run stopped.
"""

from __future__ import annotations

from typing import Any

from sdmoe_train.checkpointing.manifest import newest_valid_checkpoint, verify_checkpoint
from sdmoe_train.checkpointing.periodic import PeriodicCheckpoint

CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")
"""``--ckpt_path`` values Lightning resolves itself instead of reading a file."""


def verify_explicit_checkpoint(ckpt_path: str | None) -> None:
    """Checks a ``--ckpt_path`` file before anything reads it, so damage is named instead of failing in torch.load.

    Raises:
        ConfigError: Naming the file and what is wrong with it.
    """
    if ckpt_path is not None and ckpt_path not in CKPT_PATH_KEYWORDS:
        verify_checkpoint(ckpt_path)


def resolve_resume_checkpoint(trainer: Any, ckpt_path: str | None, auto_resume: bool) -> str | None:
    """The checkpoint ``fit`` continues from: ``ckpt_path`` if given, else the newest valid one.

    Raises:
        ConfigError: If checkpoints exist but every auto-resume candidate is damaged.
    """
    if ckpt_path is not None:
        return ckpt_path  # verified while parsing (verify_explicit_checkpoint)
    if not auto_resume:
        return None
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, PeriodicCheckpoint) and callback.dirpath is not None:
            newest = newest_valid_checkpoint(callback.dirpath)
            if newest is not None:
                return str(newest)
    return None
