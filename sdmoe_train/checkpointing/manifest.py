"""The checkpoint manifest: which checkpoints of a run are complete, their sizes and hashes, and pruning.

``manifest.json`` in the checkpoint directory lists every published checkpoint (a ``.ckpt`` file, or a
directory of shards from a sharded strategy) with its global step and the size and SHA-256 of each
file. A checkpoint enters the manifest only after it was renamed into place, so an entry always names
a complete write; its hashes then catch later damage (a truncated copy, a bad disk, a hand edit).
Auto-resume walks the entries from the newest step down and takes the first that verifies, warning
about each one it skips.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdmoe_train.errors import ConfigError
from sdmoe_train.io.atomic import file_sha256, write_json_atomically

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def read_manifest(dirpath: str | Path) -> list[dict[str, Any]]:
    """The manifest entries of a checkpoint directory, oldest step first; empty if there is no manifest.

    Raises:
        ConfigError: If the manifest exists but cannot be parsed.
    """
    path = Path(dirpath) / MANIFEST_FILE
    if not path.is_file():
        return []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = list(manifest["checkpoints"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"checkpoint manifest {path} is not readable ({error}); restore it from a backup or delete it and "
            "pass --ckpt_path explicitly"
        ) from error
    return sorted(entries, key=lambda entry: entry["step"])


def record_checkpoint(
    path: str | Path, step: int, *, with_hashes: bool = True, keep_last_k: int | None = None
) -> list[Path]:
    """Adds a published checkpoint to its directory's manifest and prunes the oldest beyond ``keep_last_k``.

    Args:
        path: The checkpoint file or directory, already in its final place.
        step: Its global step.
        with_hashes: Record SHA-256 hashes (reads the checkpoint once); False records sizes only.
        keep_last_k: Keep the newest k checkpoints with distinct names (None keeps all). A checkpoint
            whose name has no step in it (``last.ckpt``) is rewritten in place and never counts.

    Returns:
        The checkpoints deleted by pruning.
    """
    path = Path(path)
    entry = {"name": path.name, "step": step, "saved_at": time.time(), "files": _describe(path, with_hashes)}
    entries = [old for old in read_manifest(path.parent) if old["name"] != path.name]
    entries.append(entry)
    entries.sort(key=lambda item: item["step"])
    removed: list[Path] = []
    if keep_last_k is not None:
        rotating = [item for item in entries if _rotates(item["name"])]
        for stale in rotating[: max(len(rotating) - keep_last_k, 0)]:
            entries.remove(stale)
            removed.append(path.parent / stale["name"])
    # Record first, delete second: a crash in between leaves an unlisted file, never a listed missing one.
    write_json_atomically(path.parent / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "checkpoints": entries})
    for stale_path in removed:
        if stale_path.is_dir():
            shutil.rmtree(stale_path, ignore_errors=True)
        else:
            stale_path.unlink(missing_ok=True)
    return removed


def _rotates(name: str) -> bool:
    return "step" in name


def _describe(path: Path, with_hashes: bool) -> dict[str, dict[str, Any]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    described = {}
    for file in files:
        key = "." if file == path else str(file.relative_to(path))
        described[key] = {"size": file.stat().st_size, **({"sha256": file_sha256(file)} if with_hashes else {})}
    return described


def checkpoint_problem(path: str | Path, entry: dict[str, Any] | None = None) -> str | None:
    """Why a checkpoint cannot be used, or None if it verifies.

    With a manifest entry (looked up in the checkpoint's directory when not given) every file's size
    and hash must match. A file without an entry must at least open as a ``torch.save`` archive, which
    detects truncation.
    """
    path = Path(path)
    if entry is None:
        entry = next((item for item in read_manifest(path.parent) if item["name"] == path.name), None)
    if not path.exists():
        return f"{path} does not exist"
    if entry is None:
        return None if path.is_dir() else archive_problem(path)
    for key, expected in entry["files"].items():
        file = path if key == "." else path / key
        if not file.is_file():
            return f"{file} is missing (listed in {MANIFEST_FILE})"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} has {size} bytes but {expected['size']} were written (truncated or replaced)"
        if "sha256" in expected and file_sha256(file) != expected["sha256"]:
            return f"{file} does not match the SHA-256 recorded in {MANIFEST_FILE} (corrupted)"
    return None


def archive_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` archive (every member's CRC is checked), or None."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return f"{path} is not a complete torch checkpoint archive (truncated or not a checkpoint)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return f"{path} is not a readable torch checkpoint archive ({error})"
    return None if bad_member is None else f"{path}: member {bad_member} is corrupted"


def verify_checkpoint(path: str | Path) -> Path:
    """Checks a checkpoint given explicitly (``--ckpt_path``).

    Raises:
        ConfigError: Naming the file and what is wrong with it.
    """
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ConfigError(
            f"ckpt_path={str(path)!r} cannot be resumed from: {problem}; pass an earlier checkpoint "
            f"(see {MANIFEST_FILE} next to it) or leave ckpt_path unset to resume from the newest valid one"
        )
    return Path(path)


def newest_valid_checkpoint(dirpath: str | Path, unlisted: Iterable[tuple[Path, int]] = ()) -> Path | None:
    """The checkpoint auto-resume continues from: the newest manifest entry that verifies.

    Each newer entry that fails verification is skipped with a warning naming the file and the
    problem. Files that never reached the manifest (a save interrupted between rename and record)
    count only when passed in ``unlisted`` as already verified ``(path, step)`` pairs
    (:func:`~sdmoe_train.checkpointing.recovery.adoptable_checkpoints`).

    Returns:
        Its path, or None when the directory holds no manifest entry (a fresh run).

    Raises:
        ConfigError: If entries exist but none verifies.
    """
    dirpath = Path(dirpath)
    candidates = [(dirpath / entry["name"], entry["step"], entry) for entry in read_manifest(dirpath)]
    candidates += [(Path(path), step, None) for path, step in unlisted]
    candidates.sort(key=lambda candidate: candidate[1])
    problems = []
    for candidate, step, entry in reversed(candidates):
        problem = None if entry is None else checkpoint_problem(candidate, entry)
        if problem is None:
            if problems:
                log.warning("resuming from the older checkpoint %s (step %d)", candidate, step)
            return candidate
        log.warning("skipping checkpoint %s (step %d): %s", candidate, step, problem)
        problems.append(problem)
    if problems:
        raise ConfigError(
            f"no checkpoint in {dirpath} verifies against {MANIFEST_FILE}: {'; '.join(problems)}; restore one, or "
            f"start the run afresh in a new directory (or with --auto_resume=false)"
        )
    return None


def remove_stale_partials(dirpath: str | Path) -> None:
    """Deletes temporary outputs of saves that were interrupted (hidden ``.NAME.*`` entries)."""
    for stale in Path(dirpath).glob(".*.partial"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.unlink(stale)
