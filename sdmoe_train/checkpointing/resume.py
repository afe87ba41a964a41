"""Which checkpoint ``fit`` continues from, and the checks it passes before any logger or tensor is touched.

Auto-resume walks the manifest of every :class:`~sdmoe_train.checkpointing.periodic.PeriodicCheckpoint`
directory from the newest entry down (:func:`~sdmoe_train.checkpointing.manifest.newest_valid_checkpoint`),
so a requeued job, or the same command run again, continues where the run stopped. Checkpoints that a crash
left outside the manifest count when they verify (:mod:`~sdmoe_train.checkpointing.recovery`).

``--ckpt_path last`` is resolved here too, never by Lightning (which takes the newest file by date, unverified,
and starts from scratch when there is none): it is the newest manifest entry, and it must verify.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdmoe_train.checkpointing.manifest import newest_valid_checkpoint, read_manifest, verify_checkpoint
from sdmoe_train.checkpointing.periodic import PeriodicCheckpoint
from sdmoe_train.checkpointing.recovery import check_resumable
from sdmoe_train.checkpointing.run_identity import check_resume_compatibility, run_identity
from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel.rank_files import rank_file

LAST = "last"
"""``--ckpt_path last``: the newest checkpoint of the run, verified."""
UNSUPPORTED_KEYWORDS = ("best", "hpc", "registry")
"""Lightning's other ``--ckpt_path`` keywords: none names a checkpoint this CLI can verify."""


def verify_explicit_checkpoint(ckpt_path: str | None) -> None:
    """Checks a ``--ckpt_path`` file before anything reads it, so damage is named instead of failing in torch.load.

    Raises:
        ConfigError: Naming the file and what is wrong with it, or an unsupported keyword.
    """
    if ckpt_path in UNSUPPORTED_KEYWORDS:
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is not supported: pass a checkpoint file, 'last' (the newest verified checkpoint "
            "of this run), or leave ckpt_path unset to resume from the newest valid one"
        )
    if ckpt_path is not None and ckpt_path != LAST:
        verify_checkpoint(ckpt_path)
        _refuse_foreign_directory(Path(ckpt_path))


def _refuse_foreign_directory(path: Path) -> None:
    # A directory is a checkpoint only as MoEDeepSpeedStrategy's per-rank files (or DeepSpeed's own layout,
    # marked by its `latest` file); any other folder would fail inside torch.load with IsADirectoryError.
    if path.is_dir() and not (rank_file(path, 0).is_file() or (path / "latest").is_file()):
        raise ConfigError(
            f"ckpt_path={str(path)!r} is a directory but no sharded checkpoint (no {rank_file(path, 0).name}); pass "
            "a .ckpt file or a checkpoint directory written by MoEDeepSpeedStrategy"
        )


def checkpoint_directories(trainer: Any) -> list[Path]:
    """The directories of the trainer's :class:`PeriodicCheckpoint` callbacks."""
    return [
        Path(callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, PeriodicCheckpoint) and callback.dirpath is not None
    ]


def resolve_resume_checkpoint(trainer: Any, ckpt_path: str | None, auto_resume: bool) -> str | None:
    """The checkpoint ``fit`` continues from: ``ckpt_path`` if given (``last`` resolved), else the newest valid one.

    Raises:
        ConfigError: If checkpoints exist but every auto-resume candidate is damaged, or ``last`` names none
            that verifies.
    """
    if ckpt_path == LAST:
        return str(newest_checkpoint(trainer))
    if ckpt_path is not None:
        return ckpt_path  # verified while parsing (verify_explicit_checkpoint)
    if not auto_resume:
        return None
    for dirpath in checkpoint_directories(trainer):
        newest = newest_valid_checkpoint(dirpath, check_resumable(dirpath))
        if newest is not None:
            return str(newest)
    return None


def newest_checkpoint(trainer: Any) -> Path:
    """``--ckpt_path last``: the newest checkpoint of the trainer's checkpoint directories, which must verify.

    Raises:
        ConfigError: There is none, or it is damaged (an explicit choice never falls back to an older one).
    """
    candidates = []  # (step, when saved, path): of two checkpoints of one step, the later save is `last`
    for dirpath in checkpoint_directories(trainer):
        candidates += [
            (entry["step"], entry.get("saved_at", 0.0), dirpath / entry["name"]) for entry in read_manifest(dirpath)
        ]
        candidates += [(step, path.stat().st_mtime, path) for path, step in check_resumable(dirpath)]
    if not candidates:
        searched = ", ".join(str(path) for path in checkpoint_directories(trainer)) or "(no PeriodicCheckpoint dirpath)"
        raise ConfigError(
            f"ckpt_path='last': no checkpoint found in {searched}; leave ckpt_path unset to start afresh, or pass "
            "the path of a checkpoint file"
        )
    *_, newest = max(candidates, key=lambda candidate: candidate[:2])
    return verify_checkpoint(newest)


def check_checkpoint_matches(ckpt_path: str | None, model: Any, datamodule: Any) -> None:
    """Refuses a checkpoint written by another model or tokenizer before any logger touches the run directory.

    The same check runs again when Lightning loads the checkpoint; this earlier one keeps a rejected resume
    from starting a new log. Sharded checkpoint directories are checked only at load time.

    Raises:
        ConfigError: Listing every differing setting (:func:`check_resume_compatibility`).
    """
    if ckpt_path is None or not Path(ckpt_path).is_file():
        return
    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    identity = run_identity(model.arch, model.sdmoe, datamodule)
    check_resume_compatibility(checkpoint, identity, ckpt_path)
