"""Atomic file and directory writes: a temporary sibling, fsync, rename, fsync of the parent.

Every output a later run reads back (checkpoints, their manifest, tokenizers, exported weights) goes
through :func:`atomic_path`, so a crash, SIGKILL or full disk while writing leaves either the previous
complete file or none, never a truncated one that a resume would load. ``os.replace`` is atomic on
POSIX file systems, and the fsync of the parent directory makes the rename itself durable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HASH_CHUNK_BYTES = 8 << 20


@contextmanager
def atomic_path(path: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success its content replaces ``path`` in one rename.

    The caller writes the temporary path by any means (``torch.save``, ``safetensors``, a directory
    of shards with ``directory=True``). When the block exits normally the data is fsynced and renamed
    over ``path``; when it raises, the temporary output is removed and ``path`` is left as it was.

    Args:
        path: The final file (or directory) path; its parent directories are created.
        directory: The caller writes a directory (created empty) instead of a file.

    Yields:
        The temporary path to write.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}."
    if directory:
        temp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=final.parent))
    else:
        fd, temp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=final.parent)
        os.close(fd)
        temp = Path(temp_name)
    try:
        yield temp
        publish(temp, final)
    except BaseException:
        _remove(temp)
        raise


def publish(temp: str | Path, path: str | Path) -> None:
    """Makes a completely written temporary file or directory durable and renames it to ``path``.

    ``temp`` must lie in the same directory as ``path`` (a rename across file systems is a copy).
    A directory cannot replace another in one rename: the old one is moved aside first, so a crash in
    between leaves the new complete directory under its temporary name, never a partial one.
    """
    temp, final = Path(temp), Path(path)
    _fsync_tree(temp)
    # mkstemp/mkdtemp create private (0600/0700) entries; outputs are shared like any other file.
    os.chmod(temp, 0o755 if temp.is_dir() else 0o644)
    if temp.is_dir() and final.is_dir():
        old = final.with_name(f".{final.name}.old")
        _remove(old)
        os.replace(final, old)
        os.replace(temp, final)
        _remove(old)
    else:
        os.replace(temp, final)
    fsync_path(final.parent)


def write_text_atomically(path: str | Path, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")


def write_json_atomically(path: str | Path, payload: Any) -> None:
    """Writes ``payload`` as indented JSON to ``path`` atomically."""
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def copy_file_atomically(source: str | Path, destination: str | Path) -> Path:
    """Copies ``source`` to ``destination`` atomically (data and permission bits); returns the destination."""
    with atomic_path(destination) as temp:
        shutil.copyfile(source, temp)
    return Path(destination)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_tree(path: Path) -> None:
    if path.is_file():
        fsync_path(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def fsync_path(path: Path) -> None:
    """Flushes a file's data, or a directory's entries (new files, renames), to disk."""
    # Opening read-only works for files and directories alike; fsync flushes either.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
