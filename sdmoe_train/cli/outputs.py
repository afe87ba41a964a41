"""Checks of the files and folders a subcommand will write, made before it does any work.

An output path below a file, a folder where a file should go or a folder this user cannot write would
otherwise fail with an ``OSError`` traceback at the end, after the evaluation or export it was to hold.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdmoe_train.errors import ConfigError


def check_output_directory(path: str | Path, option: str) -> Path:
    """Checks that the directory ``path`` exists or can be created, and that this user can write in it.

    Raises:
        ConfigError: Naming ``option`` and the path when it is a file, lies below a file or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option}={str(path)!r} is a file, not a directory; give a directory to write into")
    check_creatable_directory(path, option)
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Checks that the file ``path`` can be written: not a directory, in a folder that exists or can be created.

    Raises:
        ConfigError: Naming ``option`` and the path when it is a directory, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option}={str(path)!r} is a directory; give a file name (e.g. {path / 'out.json'})")
    check_creatable_directory(path.parent, option)
    return path


def check_creatable_directory(path: str | Path, setting: str) -> None:
    """Checks, without creating anything, that the directory ``path`` exists or can be created by this user.

    Nothing is created, so a command refused for another reason afterwards leaves no folder behind.

    Raises:
        ConfigError: Naming ``setting`` when ``path`` or its nearest existing ancestor is a file, or that
            ancestor is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot write to {str(path)!r} ({setting}): {existing} is a file; choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write to {str(path)!r} ({setting}): {existing} is not writable for this user; choose another "
            "folder"
        )
