"""Prepared data: a corpus or mixture tokenized once into a directory that any number of runs read.

Unlike the token cache (``data.corpus.cache_dir``, keyed by a fingerprint of the raw files, so a run
needs those files to find it), a prepared directory is named by the recipe (``data.prepared_dir``) and
is self-describing: ``fit`` reads it without the raw text and without tokenizing. Layout (format 1)::

    prepared.json                 format, tokenizer identity, split settings, sources and their sizes
    tokenizer.json                the tokenizer that produced the ids
    <source>/manifest.json        the source's token-cache manifest (dtype, vocab, EOS, splits, origin files)
    <source>/train.bin            token ids, raw little-endian uint16 (vocab <= 65536) or uint32
    <source>/train.docs.npy       int64 document offsets (num_docs + 1): document d is
                                  tokens[offsets[d]:offsets[d + 1]] and ends with the EOS id
    <source>/validation.bin       the held-out documents, same layout
    <source>/validation.docs.npy

``prepare`` builds each source in a staging directory and renames it into place, and rewrites
``prepared.json`` atomically, so readers never see a half-written source; concurrent ``prepare`` runs
(one per node) take turns through a lock file. Sources already prepared
are never rewritten: preparing a recipe whose sources changed is refused (other runs may read them),
and sources new to the recipe are added beside the existing ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from sdmoe_train.data.cache import (
    MANIFEST_FILE,
    SPLITS,
    TokenCache,
    cache_fingerprint,
    tokenize_source,
    writable_staging_directory,
    write_json,
)
from sdmoe_train.data.config import DataConfig, SourceSettings
from sdmoe_train.data.tokenizer import TOKENIZER_FILE, eos_token_id
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import fsync_path, write_json_atomically, write_text_atomically

PREPARED_FORMAT = "sdmoe-train-prepared"
PREPARED_FORMAT_VERSION = 1
"""Bumped when the layout changes; readers refuse other versions."""
PREPARED_FILE = "prepared.json"
LOCK_FILE = ".prepare.lock"
"""Held while a process prepares into the directory."""
OFFSETS_SUFFIX = ".docs.npy"


@dataclass(frozen=True)
class PreparedSource:
    """One opened source of a prepared directory."""

    cache: TokenCache
    """Memory maps of its train and validation tokens."""
    offsets: dict[str, np.ndarray]
    """Split -> document offsets (read-only memory map, num_docs + 1 entries)."""


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """SHA-256 of the serialized tokenizer: the identity recorded in prepared data and checkpoints."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def prepare_sources(
    config: DataConfig, sources: dict[str, SourceSettings], tokenizer: Tokenizer, directory: str | Path
) -> dict[str, PreparedSource]:
    """Tokenizes the sources into ``directory`` (see the module docstring), or reuses what is there.

    Args:
        config: Shared data settings (validation share, seed, tokenizing processes).
        sources: Source name -> where its documents come from; local files must exist.
        tokenizer: The tokenizer.
        directory: The prepared directory (``data.prepared_dir``); created if missing.

    Returns:
        Every source of the recipe, opened.

    Raises:
        ConfigError: If the directory holds data prepared with another tokenizer or split settings,
            or a source prepared from other inputs, or is a non-empty directory of something else.
    """
    root = Path(directory).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data.prepared_dir={str(directory)!r} is a file, not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / LOCK_FILE).touch()
    except (PermissionError, FileExistsError, NotADirectoryError) as error:
        raise ConfigError(
            f"data.prepared_dir={str(directory)!r} cannot be written ({type(error).__name__}: {error}); choose a "
            "writable directory (runs that only read prepared data need no write access once it is complete)"
        ) from error
    with _exclusive(root):
        metadata = _existing_metadata(root)
        if metadata is None:
            metadata = _new_metadata(config, tokenizer)
            write_json_atomically(root / PREPARED_FILE, metadata)
        else:
            _check_shared(metadata, config, tokenizer, root)
        if not (root / TOKENIZER_FILE).is_file():
            write_text_atomically(root / TOKENIZER_FILE, tokenizer.to_str())
        for name, source in sources.items():
            fingerprint = cache_fingerprint(config, tokenizer, source)
            entry = metadata["sources"].get(name)
            if entry is not None:
                if entry["fingerprint"] != fingerprint:
                    raise ConfigError(
                        f"data.prepared_dir={str(directory)!r} holds source {name!r} prepared from other inputs "
                        f"(fingerprint {entry['fingerprint']} != {fingerprint}: its files, their sizes or times "
                        "changed); prepared data is never overwritten because other runs may read it: delete the "
                        "directory or choose another data.prepared_dir"
                    )
                continue
            metadata["sources"][name] = _prepare_source(config, source, tokenizer, fingerprint, root / name)
            write_json_atomically(root / PREPARED_FILE, metadata)
    return open_prepared(root, config, tokenizer, list(sources))


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    # Lightning prepares data on one process per node; nodes sharing a file system take turns here.
    with open(root / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _new_metadata(config: DataConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    vocab_size = tokenizer.get_vocab_size()
    return {
        "format": PREPARED_FORMAT,
        "format_version": PREPARED_FORMAT_VERSION,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": tokenizer_sha256(tokenizer),
            "vocab_size": vocab_size,
            "eos_token_id": eos_token_id(tokenizer),
        },
        "dtype": np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32).name,
        "val_fraction": config.val_fraction,
        "shuffle_seed": config.shuffle_seed,
        "sources": {},
    }


def _prepare_source(
    config: DataConfig, source: SourceSettings, tokenizer: Tokenizer, fingerprint: str, final: Path
) -> dict[str, Any]:
    if final.exists():
        # A directory prepared.json does not list: left by a build killed after its rename.
        shutil.rmtree(final)
    staging = writable_staging_directory(final, "data.prepared_dir", str(final.parent))
    try:
        manifest, document_lengths = tokenize_source(config, source, tokenizer, fingerprint, staging)
        for split, lengths in document_lengths.items():
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            with open(staging / f"{split}{OFFSETS_SUFFIX}", "wb") as handle:
                np.save(handle, offsets)
                handle.flush()
                os.fsync(handle.fileno())
        write_json(staging / MANIFEST_FILE, manifest)
        fsync_path(staging)
        os.rename(staging, final)
        fsync_path(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    splits = {
        split: {"num_tokens": info["num_tokens"], "num_docs": info["num_docs"]}
        for split, info in manifest["splits"].items()
    }
    return {"directory": final.name, "fingerprint": fingerprint, "origin": manifest["sources"], "splits": splits}


def _existing_metadata(root: Path) -> dict[str, Any] | None:
    if not (root / PREPARED_FILE).is_file():
        leftovers = [path.name for path in root.iterdir() if not path.name.startswith(".")]
        if leftovers:
            raise ConfigError(
                f"data.prepared_dir={str(root)!r} is a non-empty directory without {PREPARED_FILE} "
                f"(holds {sorted(leftovers)[:5]}); choose an empty or new directory"
            )
        return None
    return read_metadata(root)


def read_metadata(root: Path) -> dict[str, Any]:
    """Reads and checks ``prepared.json`` of a prepared directory.

    Raises:
        ConfigError: If it is missing, unreadable, or of another format or version.
    """
    file = root / PREPARED_FILE
    if not file.is_file():
        raise ConfigError(
            f"data.prepared_dir={str(root)!r} holds no prepared data ({PREPARED_FILE} is missing); "
            "prepare it with `sdmoe-train prepare --config <recipe>`"
        )
    try:
        metadata = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{file} is not readable JSON ({error}); prepare the data again") from error
    if not isinstance(metadata, dict) or metadata.get("format") != PREPARED_FORMAT:
        raise ConfigError(f'{file} is not sdmoe-train prepared data (no "format": "{PREPARED_FORMAT}")')
    required = {"tokenizer": dict, "sources": dict, "dtype": str, "val_fraction": (int, float), "shuffle_seed": int}
    damaged = [key for key, kind in required.items() if not isinstance(metadata.get(key), kind)]
    if metadata.get("format_version") == PREPARED_FORMAT_VERSION and damaged:
        raise ConfigError(f"{file} is damaged (missing or invalid {damaged}); prepare the data again")
    if metadata.get("format_version") != PREPARED_FORMAT_VERSION:
        raise ConfigError(
            f"{file} has format_version {metadata.get('format_version')!r}; this version of sdmoe-train reads "
            f"version {PREPARED_FORMAT_VERSION}: prepare the data again into a new data.prepared_dir"
        )
    return metadata


def _check_shared(metadata: dict[str, Any], config: DataConfig, tokenizer: Tokenizer, root: Path) -> None:
    recorded = metadata["tokenizer"]
    sha256 = tokenizer_sha256(tokenizer)
    if recorded["sha256"] != sha256 or recorded["vocab_size"] != tokenizer.get_vocab_size():
        raise ConfigError(
            f"data.prepared_dir={str(root)!r} was prepared with another tokenizer (sha256 {recorded['sha256'][:12]}, "
            f"vocab {recorded['vocab_size']}) than data.corpus.tokenizer={config.tokenizer!r} (sha256 {sha256[:12]}, "
            f"vocab {tokenizer.get_vocab_size()}); use its copy, data.corpus.tokenizer={str(root / TOKENIZER_FILE)!r}, "
            "or prepare into another directory"
        )
    for name in ("val_fraction", "shuffle_seed"):
        if metadata[name] != getattr(config, name):
            raise ConfigError(
                f"data.prepared_dir={str(root)!r} was prepared with data.corpus.{name}={metadata[name]!r} but the "
                f"recipe sets {getattr(config, name)!r}; the validation split is fixed when data is prepared: "
                f"set data.corpus.{name}={metadata[name]!r} or prepare into another directory"
            )


def open_prepared(
    directory: str | Path, config: DataConfig, tokenizer: Tokenizer, names: list[str]
) -> dict[str, PreparedSource]:
    """Opens the named sources of a prepared directory, checking it against the recipe.

    Args:
        directory: ``data.prepared_dir``.
        config: Shared data settings; validation share and seed must match the prepared ones.
        tokenizer: The recipe's tokenizer; must be the one the data was prepared with.
        names: Sources to open.

    Returns:
        Name -> opened source, in the order of ``names``.

    Raises:
        ConfigError: If the directory is missing or damaged, or differs from the recipe in tokenizer,
            split settings or sources.
    """
    root = Path(directory).expanduser()
    metadata = read_metadata(root)
    _check_shared(metadata, config, tokenizer, root)
    missing = [name for name in names if name not in metadata["sources"]]
    if missing:
        raise ConfigError(
            f"data.prepared_dir={str(root)!r} has no source(s) {missing} (it has {sorted(metadata['sources'])}); "
            "add them with `sdmoe-train prepare --config <recipe>` or fix the source names"
        )
    return {name: _open_source(root, metadata["sources"][name]) for name in names}


def _open_source(root: Path, entry: dict[str, Any]) -> PreparedSource:
    path = root / entry["directory"]
    if not (path / MANIFEST_FILE).is_file():
        raise ConfigError(f"prepared source {path} is missing its {MANIFEST_FILE}; prepare the data again")
    cache = TokenCache.open(path)
    offsets = {}
    for split in SPLITS:
        file = path / f"{split}{OFFSETS_SUFFIX}"
        expected = entry["splits"][split]
        try:
            split_offsets = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as error:
            raise ConfigError(f"prepared source {path}: {file.name} is missing or damaged ({error})") from error
        num_tokens = len(cache.train_tokens if split == "train" else cache.val_tokens)
        well_formed = (
            split_offsets.dtype == np.int64
            and split_offsets.shape == (expected["num_docs"] + 1,)
            and int(split_offsets[0]) == 0
            and int(split_offsets[-1]) == num_tokens == expected["num_tokens"]
        )
        if not well_formed:
            raise ConfigError(
                f"prepared source {path}: {file.name} does not describe {expected['num_docs']} documents of "
                f"{expected['num_tokens']} tokens in {split}.bin; prepare the data again"
            )
        offsets[split] = split_offsets
    return PreparedSource(cache, offsets)
