"""Start-up recovery of a checkpoint directory, before ``fit`` decides where to resume from.

A crash leaves three kinds of debris, each handled here on rank 0:

- hidden ``.NAME.partial`` outputs of an interrupted save and ``.manifest.json.*.tmp`` files of an
  interrupted manifest write: deleted;
- a checkpoint renamed into place but killed before it reached ``manifest.json``: adopted into the
  manifest when it verifies as a complete archive (it was fsynced before the rename, so it normally
  does), then pruned by ``keep_last_k`` like any other;
- a lost ``manifest.json`` next to checkpoints: rebuilt the same way, with a warning. Checkpoints that
  cannot be verified without a manifest (a sharded strategy's directories, a damaged file) are never
  adopted; if nothing else is left, ``fit`` refuses instead of silently starting again at step 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdmoe_train.checkpointing.manifest import (
    MANIFEST_FILE,
    checkpoint_problem,
    read_manifest,
    record_checkpoint,
    remove_stale_partials,
)
from sdmoe_train.errors import ConfigError

log = logging.getLogger(__name__)


def adoptable_checkpoints(dirpath: str | Path) -> tuple[list[tuple[Path, int]], list[Path]]:
    """Checkpoints in ``dirpath`` missing from its manifest: ``(path, step)`` of those that verify, and the rest.

    Reads only, so every rank of a run can ask while rank 0 :func:`recovers <recover_checkpoint_directory>`
    the directory, and all reach the same resume decision.
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return [], []
    listed = {entry["name"] for entry in read_manifest(dirpath)}
    adoptable, refused = [], []
    for path in sorted(dirpath.iterdir()):
        if path.name in listed or not _looks_like_checkpoint(path):
            continue
        step = _verified_step(path)
        if step is None:
            refused.append(path)
        else:
            adoptable.append((path, step))
    return adoptable, refused


def check_resumable(dirpath: str | Path) -> list[tuple[Path, int]]:
    """:func:`adoptable_checkpoints` of ``dirpath``, refusing a directory whose checkpoints all go unverified.

    Raises:
        ConfigError: Checkpoints are present but none is in the manifest or can be adopted into it.
    """
    adoptable, refused = adoptable_checkpoints(dirpath)
    if refused and not adoptable and not read_manifest(dirpath):
        names = ", ".join(path.name for path in refused)
        raise ConfigError(
            f"checkpoint directory {str(dirpath)!r} holds checkpoints ({names}) but no {MANIFEST_FILE} entry, and "
            "they cannot be verified; resume from one explicitly with --ckpt_path PATH, or move them away (or use a "
            "new --trainer.default_root_dir) to start afresh"
        )
    return adoptable


def recover_checkpoint_directory(dirpath: str | Path, keep_last_k: int | None = None, with_hashes: bool = True) -> None:
    """Cleans ``dirpath`` after a crash and brings its manifest up to date with the checkpoints on disk (rank 0).

    Args:
        dirpath: A :class:`~sdmoe_train.checkpointing.periodic.PeriodicCheckpoint` directory (may not exist).
        keep_last_k: The callback's ``keep_last_k``, applied to adopted checkpoints too.
        with_hashes: The callback's ``hash_files``, used for adopted checkpoints.

    Raises:
        ConfigError: Checkpoints are present but none is in the manifest or can be adopted into it.
    """
    dirpath = Path(dirpath)
    if not dirpath.is_dir():
        return
    remove_stale_partials(dirpath)
    for temporary in dirpath.glob(f".{MANIFEST_FILE}.*.tmp"):
        temporary.unlink(missing_ok=True)
    manifest_missing = not (dirpath / MANIFEST_FILE).is_file()
    adoptable = check_resumable(dirpath)
    for path, step in adoptable:
        log.warning("adopting checkpoint %s (step %d), which is missing from %s", path, step, MANIFEST_FILE)
        record_checkpoint(path, step, with_hashes=with_hashes, keep_last_k=keep_last_k)
    if manifest_missing and adoptable:
        log.warning(
            "%s was missing in %s: rebuilt it from %d checkpoint(s) that verify", MANIFEST_FILE, dirpath, len(adoptable)
        )


def _looks_like_checkpoint(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    return path.suffix == ".ckpt" or (path.is_dir() and any(path.iterdir()))


def _verified_step(path: Path) -> int | None:
    """The global step of a complete single-file checkpoint; None for a directory or a damaged file."""
    if path.is_dir() or checkpoint_problem(path, entry=None) is not None:
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure to read means: do not adopt
        log.warning("cannot read %s (%s)", path, error)
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return step if isinstance(step, int) else None
