"""Checks of the files and folders a subcommand will write, made before it does any work.

An output path below a file, a folder where a file should go or a folder this user cannot write would
otherwise fail with an ``OSError`` traceback at the end, after the evaluation or export it was to hold.
"""

from __future__ import annotations

from pathlib import Path

from sdmoe_train.checkpointing.run_directory import check_writable
from sdmoe_train.errors import ConfigError


def check_output_directory(path: str | Path, option: str) -> Path:
    """Creates the directory ``path`` if needed and checks that files can be written in it.

    Raises:
        ConfigError: Naming ``option`` and the path when it is a file, lies below a file or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option}={str(path)!r} is a file, not a directory; give a directory to write into")
    check_writable(path, option)
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Checks that the file ``path`` can be written (its folder is created if needed).

    Raises:
        ConfigError: Naming ``option`` and the path when it is a directory, or its folder cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option}={str(path)!r} is a directory; give a file name (e.g. {path / 'out.json'})")
    check_writable(path.parent, option)
    return path
