"""Installs a second offline corpus: the King James Bible from Debian's ``bible-kjv`` package, one file per chapter.

The King James Version (1611/1769) is in the public domain. Debian's ``bible-kjv`` package (install it
with ``apt-get install bible-kjv``) ships the text and the ``bible`` program; ``bible -f
gen1:1-rev22:21`` prints all 31,102 verses, one per line, each prefixed by its reference (``Ge1:1 In the
beginning ...``). The preparer strips the references and writes every chapter as one document (1,189
files of about a thousand tokens, so packed training sequences cross many document boundaries),
named ``<book>-<abbreviation>-<chapter>.txt`` in canonical order, verses one per line.

Usage: ``sdmoe-train kjv-corpus DEST`` writes the chapters into DEST (idempotent).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sdmoe_train.io import write_text_atomically

BIBLE_COMMAND = ("bible", "-f", "gen1:1-rev22:21")
"""Prints the whole text, one verse per line; from Debian's ``bible-kjv`` package."""
INSTALL_COMMAND = "apt-get install bible-kjv"
_VERSE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


@dataclass
class Chapter:
    """The verses of one chapter."""

    book_number: int
    """1 (Genesis) to 66 (Revelation), in order of appearance."""
    book: str
    """The book's abbreviation as ``bible`` prints it (``Ge``, ``Exo``, ..., ``Rev``)."""
    chapter: int
    """Chapter number within the book."""
    verses: list[str] = field(default_factory=list)
    """Verse texts without their references."""

    @property
    def file_name(self) -> str:
        return f"{self.book_number:02d}-{self.book}-{self.chapter:03d}.txt"

    @property
    def text(self) -> str:
        return "\n".join(self.verses) + "\n"


def parse_chapters(lines: Iterable[str]) -> list[Chapter]:
    """Groups ``bible -f`` output into chapters, stripping the verse references.

    Args:
        lines: Output lines, each ``<Book><chapter>:<verse> <text>``.

    Returns:
        The chapters in order.

    Raises:
        ValueError: If a line does not start with a verse reference.
    """
    chapters: list[Chapter] = []
    books: list[str] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:
            raise ValueError(f"line {number} is not a verse ('<Book><chapter>:<verse> <text>'): {line[:60]!r}")
        book, chapter = match["book"], int(match["chapter"])
        if not books or books[-1] != book:
            books.append(book)
        if not chapters or (chapters[-1].book, chapters[-1].chapter) != (book, chapter):
            chapters.append(Chapter(len(books), book, chapter))
        chapters[-1].verses.append(match["text"].strip())
    return chapters


def bible_text() -> str:
    """Runs ``bible`` and returns the whole King James text, one verse per line.

    Raises:
        FileNotFoundError: If the ``bible`` program is not installed, naming the package to install.
    """
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise FileNotFoundError(
            f"the King James corpus needs the `bible` program of Debian's bible-kjv package; install it with "
            f"`{INSTALL_COMMAND}` (as root, after apt-get update)"
        )
    return subprocess.run(BIBLE_COMMAND, check=True, capture_output=True, text=True).stdout


def install_kjv_corpus(destination: Path, text: str | None = None) -> list[Path]:
    """Writes one file per chapter into ``destination``; files already there with the same text are kept.

    Args:
        destination: Directory to create or fill.
        text: ``bible -f`` output to split; None runs ``bible``.

    Returns:
        The chapter files, in canonical order.
    """
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    files = []
    for chapter in parse_chapters((bible_text() if text is None else text).splitlines()):
        target = destination / chapter.file_name
        if not (target.is_file() and target.read_text(encoding="utf-8") == chapter.text):
            write_text_atomically(target, chapter.text)
        files.append(target)
    return files
