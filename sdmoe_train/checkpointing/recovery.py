"""Start-up recovery of a checkpoint directory, before ``fit`` decides where to resume from.

A crash leaves three kinds of debris, each handled here on rank 0:

- hidden ``.NAME.partial`` outputs of an interrupted save and ``.manifest.json.*.tmp`` files of an
  interrupted manifest write: deleted;
- a checkpoint renamed into place but killed before it reached ``manifest.json``: adopted into the
  manifest when it verifies as complete (it was fsynced before the rename, so it normally does), then
  pruned by ``keep_last_k`` like any other. A single file must be a complete ``torch.save`` archive; a
  :class:`~sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy` directory must hold exactly the rank files
  its layout names, each a complete archive of the same step;
- a lost ``manifest.json`` next to checkpoints: rebuilt the same way, with a warning.

Checkpoints that cannot be verified without a manifest (a damaged file, an incomplete directory, another
strategy's directory) are never adopted, resumed from or deleted: each is named in a warning, and if
nothing else is left, ``fit`` refuses instead of silently starting again at step 0.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sdmoe_train.checkpointing.manifest import (
    MANIFEST_FILE,
    archive_problem,
    read_manifest,
    record_checkpoint,
    remove_stale_partials,
)
from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel.rank_files import LAYOUT_KEY, rank_file

log = logging.getLogger(__name__)


def adoptable_checkpoints(dirpath: str | Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, str]]]:
    """Checkpoints in ``dirpath`` missing from its manifest: ``(path, step)`` of those that verify, and
    ``(path, why not)`` of the rest.

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
        step, problem = _verified_step(path)
        if step is None:
            refused.append((path, problem))
        else:
            adoptable.append((path, step))
    return adoptable, refused


def check_resumable(dirpath: str | Path) -> list[tuple[Path, int]]:
    """:func:`adoptable_checkpoints` of ``dirpath``, refusing a directory whose checkpoints all go unverified.

    Raises:
        ConfigError: Checkpoints are present but none is in the manifest or can be adopted into it.
    """
    adoptable, refused = adoptable_checkpoints(dirpath)
    _refuse_unresumable(dirpath, adoptable, refused)
    return adoptable


def _refuse_unresumable(
    dirpath: str | Path, adoptable: list[tuple[Path, int]], refused: list[tuple[Path, str]]
) -> None:
    if refused and not adoptable and not read_manifest(dirpath):
        names = ", ".join(path.name for path, _ in refused)
        raise ConfigError(
            f"checkpoint directory {str(dirpath)!r} holds checkpoints ({names}) but no {MANIFEST_FILE} entry, and "
            "they cannot be verified; resume from one explicitly with --ckpt_path PATH, or move them away (or use a "
            "new --trainer.default_root_dir) to start afresh"
        )


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
    adoptable, refused = adoptable_checkpoints(dirpath)
    _refuse_unresumable(dirpath, adoptable, refused)
    for path, problem in refused:
        log.warning(
            "not adopting %s into %s: %s; it is kept, but never resumed from (delete it once it is not needed)",
            path,
            MANIFEST_FILE,
            problem,
        )
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


def _verified_step(path: Path) -> tuple[int | None, str]:
    """The global step of a complete checkpoint missing from the manifest, or None and why it is not adopted."""
    if path.is_dir():
        return _verified_rank_directory_step(path)
    problem = archive_problem(path)
    if problem is not None:
        return None, problem
    step = _step_and_layout(path)[0]
    return (step, "") if step is not None else (None, f"{path} holds no global step")


def _verified_rank_directory_step(path: Path) -> tuple[int | None, str]:
    """The step of a complete MoEDeepSpeedStrategy directory: every rank file of its layout, no other entry,
    each a complete archive of the same step (what its manifest entry would have listed and hashed)."""
    first = rank_file(path, 0)
    if not first.is_file():
        return None, f"{path} is a directory without {first.name} (not a MoEDeepSpeedStrategy checkpoint)"
    if (problem := archive_problem(first)) is not None:
        return None, problem
    step, layout = _step_and_layout(first)
    world_size = layout.get("world_size") if isinstance(layout, dict) else None
    if step is None or not isinstance(world_size, int) or world_size < 1:
        return None, f"{first} records no global step or parallel layout"
    expected = [rank_file(path, rank) for rank in range(world_size)]
    missing = [file.name for file in expected if not file.is_file()]
    if missing:
        return None, f"{path} lacks {', '.join(missing[:3])} of the {world_size} rank files its layout names"
    extra = sorted({entry.name for entry in path.iterdir()} - {file.name for file in expected})
    if extra:
        return None, f"{path} holds entries its layout does not name ({', '.join(extra[:3])})"
    for rank, file in enumerate(expected[1:], start=1):
        if (problem := archive_problem(file)) is not None:
            return None, problem
        rank_step, rank_layout = _step_and_layout(file)
        if rank_step != step or not isinstance(rank_layout, dict) or rank_layout.get("global_rank") != rank:
            return None, f"{file} is not rank {rank}'s file of step {step} (step {rank_step})"
    return step, ""


def _step_and_layout(path: Path) -> tuple[int | None, object]:
    """The ``global_step`` and parallel layout record of a checkpoint file (None, None when unreadable)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure to read means: do not adopt
        log.warning("cannot read %s (%s)", path, error)
        return None, None
    if not isinstance(checkpoint, dict):
        return None, None
    step = checkpoint.get("global_step")
    return (step if isinstance(step, int) else None), checkpoint.get(LAYOUT_KEY)
