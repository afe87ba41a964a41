"""Token cache: tokenize the corpus once, split it by document, and store each split as one flat array.

Layout of ``cache_dir/<fingerprint>/``::

    manifest.json      dtype, vocab size, EOS id, tokens and documents per split, sources
    train.bin          raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    validation.bin

The fingerprint hashes everything the token stream depends on (input files with sizes and
modification times, the tokenizer, the split settings), so changed inputs get a new cache and an
unchanged recipe reuses the old one without re-tokenizing. A cache is built in a temporary
directory and renamed into place only when complete, so an interrupted build never leaves a
directory that a later run would reuse.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute
from tokenizers import Tokenizer

from sdmoe_train.data.config import DataConfig, SourceSettings
from sdmoe_train.data.documents import check_text_column, load_documents
from sdmoe_train.data.tokenizer import encode_documents, eos_token_id
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import fsync_path

CACHE_FORMAT_VERSION = 1
"""Bumped whenever the cache layout or the tokenization convention changes, invalidating old caches."""

MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "validation")
_WRITE_BATCH_DOCS = 1024


@dataclass(frozen=True)
class TokenCache:
    """An opened token cache: read-only memory maps of the train and validation token streams."""

    path: Path
    """The cache directory ``cache_dir/<fingerprint>``."""
    manifest: dict[str, Any]
    """Parsed manifest.json."""
    train_tokens: np.ndarray
    """Training token stream (read-only ``np.memmap``), documents separated by EOS."""
    val_tokens: np.ndarray
    """Validation token stream; empty (a plain array) when no document was held out."""

    @classmethod
    def open(cls, path: Path) -> TokenCache:
        """Memory-maps a complete cache directory.

        Args:
            path: Directory holding manifest.json and the split files.

        Returns:
            The opened cache.

        Raises:
            ConfigError: If a split file does not match the size recorded in the manifest.
        """
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            dtype = np.dtype(manifest["dtype"])
            files = {split: path / manifest["splits"][split]["file"] for split in SPLITS}
            counts = {split: int(manifest["splits"][split]["num_tokens"]) for split in SPLITS}
            sizes = {split: files[split].stat().st_size for split in SPLITS}
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ConfigError(
                f"token cache {path} is damaged ({type(error).__name__}: {error}); delete the directory to rebuild it"
            ) from error
        tokens = {}
        for split in SPLITS:
            file, num_tokens = files[split], counts[split]
            if sizes[split] != num_tokens * dtype.itemsize:
                raise ConfigError(
                    f"token cache {path} is corrupt: {file.name} has {sizes[split]} bytes, "
                    f"expected {num_tokens} x {dtype.itemsize}; delete the directory to rebuild it"
                )
            # np.memmap cannot map an empty file, and an empty split needs no mapping.
            tokens[split] = np.memmap(file, dtype=dtype, mode="r") if num_tokens else np.empty(0, dtype)
        return cls(path=path, manifest=manifest, train_tokens=tokens["train"], val_tokens=tokens["validation"])

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that built the cache."""
        return self.manifest["vocab_size"]

    @property
    def eos_token_id(self) -> int:
        """End-of-document token id appended after every document."""
        return self.manifest["eos_token_id"]


def cache_fingerprint(config: DataConfig, tokenizer: Tokenizer, source: SourceSettings | None = None) -> str:
    """Hashes everything the cached token streams depend on.

    Args:
        config: Shared data settings (validation share and seed).
        tokenizer: The tokenizer that will encode the documents.
        source: The source whose documents are cached (one of ``data.corpora``); None means
            ``config``'s own source. Its local files must exist. The source's name and weight are
            not part of the hash: renaming or reweighting a source reuses its cache.

    Returns:
        16 hex digits naming the cache directory.
    """
    source = config if source is None else source
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "sources": source_origin(source),
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "val_fraction": config.val_fraction,
        "shuffle_seed": config.shuffle_seed,
    }
    # A .txt file is one document whatever text_field says, so it only matters for other formats.
    if source.file_format != "text":
        payload["text_field"] = source.text_field
    if source.token_field is not None:
        payload["token_field"] = source.token_field
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def source_origin(source: SourceSettings) -> list[dict[str, Any]]:
    """Where a source's documents come from: each file with size and mtime, or the hub dataset."""
    if source.dataset_name is not None:
        return [{"dataset_name": source.dataset_name, "config": source.dataset_config_name, "split": source.split}]
    origin = []
    for file in source.resolve_files():
        stat = file.stat()
        origin.append({"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return origin


def token_cache_path(config: DataConfig, tokenizer: Tokenizer, source: SourceSettings | None = None) -> Path:
    """Returns the directory that holds (or will hold) the cache of a source (None: ``config``'s own)."""
    return Path(config.cache_dir).expanduser() / cache_fingerprint(config, tokenizer, source)


def load_token_cache(config: DataConfig, tokenizer: Tokenizer, source: SourceSettings | None = None) -> TokenCache:
    """Opens the existing cache of a source (None: ``config``'s own) without building it.

    Raises:
        ConfigError: If it has not been built.
    """
    source = config if source is None else source
    path = token_cache_path(config, tokenizer, source)
    if not (path / MANIFEST_FILE).is_file():
        prefix = source.setting_prefix
        raise ConfigError(
            f"no token cache at {path} for {prefix}.data_files={source.data_files} / "
            f"{prefix}.dataset_name={source.dataset_name!r}; build it first with "
            "`sdmoe-train prepare --config <recipe>` (PretrainDataModule.prepare_data does the same)"
        )
    return TokenCache.open(path)


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Assigns documents to train and validation by a seeded shuffle of their indices.

    Validation gets ``round(val_fraction * num_docs)`` documents, at least one when val_fraction > 0
    and there are two or more documents, and never all of them.

    Args:
        num_docs: Number of documents.
        val_fraction: Share of documents held out, in [0, 1).
        seed: Seed of the shuffle.

    Returns:
        Sorted train indices and sorted validation indices (disjoint, together all documents).
    """
    num_val = round(val_fraction * num_docs)
    if val_fraction > 0 and num_docs >= 2:
        num_val = min(max(num_val, 1), num_docs - 1)
    order = np.random.default_rng(seed).permutation(num_docs)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def build_token_cache(config: DataConfig, tokenizer: Tokenizer, source: SourceSettings | None = None) -> TokenCache:
    """Builds the token cache of a source, or reuses it if one with the same fingerprint exists.

    Documents are tokenized with ``Dataset.map(num_proc=config.num_proc)``; EOS follows every
    document; documents are split into train/validation by :func:`split_documents`, and each split
    is written in document order as one flat array.

    Args:
        config: Shared data settings.
        tokenizer: The tokenizer; its fingerprint is part of the cache name.
        source: The source to cache (one of ``data.corpora``); None means ``config``'s own source.

    Returns:
        The opened cache.

    Raises:
        ConfigError: If files are missing or the text column does not exist.
    """
    source = config if source is None else source
    fingerprint = cache_fingerprint(config, tokenizer, source)
    final = Path(config.cache_dir).expanduser() / fingerprint
    if (final / MANIFEST_FILE).is_file():
        return TokenCache.open(final)
    staging = writable_staging_directory(final, "data.corpus.cache_dir", config.cache_dir)
    try:
        manifest, _ = tokenize_source(config, source, tokenizer, fingerprint, staging)
        write_json(staging / MANIFEST_FILE, manifest)
        fsync_path(staging)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process (a second node sharing the file system) finished the same cache first.
            if not (final / MANIFEST_FILE).is_file():
                raise
        fsync_path(final.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TokenCache.open(final)


def writable_staging_directory(final: Path, setting: str, value: str) -> Path:
    """Creates a private staging directory beside ``final`` (renamed into place once complete).

    Args:
        final: Where the finished directory will live; its parent is created.
        setting: The recipe setting that chose the location, for the message.
        value: Its value.

    Raises:
        ConfigError: If the location cannot be created or written (before any tokenizing starts).
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except (PermissionError, FileExistsError, NotADirectoryError) as error:
        raise ConfigError(
            f"{setting}={value!r} cannot be written ({type(error).__name__}: {error}); choose a writable directory"
        ) from error
    # mkdtemp makes the directory private (0700); the finished directory is readable like other outputs.
    staging.chmod(0o755)
    return staging


def tokenize_source(
    config: DataConfig, source: SourceSettings, tokenizer: Tokenizer, fingerprint: str, directory: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Tokenizes one source into ``directory/{train,validation}.bin`` (the token cache layout).

    Args:
        config: Shared data settings (validation share, seed, tokenizing processes).
        source: Where the documents come from.
        tokenizer: The tokenizer.
        fingerprint: :func:`cache_fingerprint` of the source, recorded in the manifest.
        directory: An empty directory that receives the split files (and a scratch folder it removes).

    Returns:
        The manifest, and the token count of every document of each split in file order.
    """
    scratch = directory / "hf"
    eos_id = eos_token_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    # uint16 holds ids 0..65535, halving the cache (and page cache) of the common vocabularies.
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    documents = load_documents(source, streaming=False, cache_dir=scratch)
    assert isinstance(documents, datasets.Dataset), "non-streaming loading returns a Dataset"
    skipped = None
    if source.token_field is None:
        documents, skipped = check_text_column(documents, source, source.resolve_files() if source.data_files else [])
    num_proc = min(config.num_proc, len(documents))
    if source.token_field is None:
        function, arguments, description = _encode_batch, {"tokenizer": tokenizer, "eos_id": eos_id}, "Tokenizing"
    else:
        function, arguments, description = _end_with_eos, {"eos_id": eos_id}, "Appending EOS"
        _check_token_ids(documents, vocab_size, source)
    tokenized = documents.map(
        function,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs=arguments,
        remove_columns=documents.column_names,
        cache_file_name=str(scratch / "tokenized.arrow"),
        # Naming the result ourselves spares datasets from hashing the tokenizer object.
        new_fingerprint=fingerprint,
        desc=description,
    )
    splits, document_lengths = {}, {}
    for split, indices in zip(
        SPLITS, split_documents(len(tokenized), config.val_fraction, config.shuffle_seed), strict=True
    ):
        file = f"{split}.bin"
        document_lengths[split] = _write_tokens(tokenized.select(indices), directory / file, dtype)
        num_tokens = int(document_lengths[split].sum())
        splits[split] = {"file": file, "num_tokens": num_tokens, "num_docs": len(indices)}
    shutil.rmtree(scratch)
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        "val_fraction": config.val_fraction,
        "shuffle_seed": config.shuffle_seed,
        "sources": source_origin(source),
        "splits": splits,
    }
    if skipped is not None:
        manifest["skipped_rows"] = {"count": skipped.count, "total": skipped.total, "first": skipped.first}
    return manifest, document_lengths


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer, eos_id: int) -> dict[str, list[list[int]]]:
    return {"input_ids": encode_documents(tokenizer, batch["text"], eos_id)}


def _end_with_eos(batch: dict[str, list], eos_id: int) -> dict[str, list[list[int]]]:
    return {"input_ids": [ids if ids and ids[-1] == eos_id else [*ids, eos_id] for ids in batch["input_ids"]]}


def _check_token_ids(documents: datasets.Dataset, vocab_size: int, source: SourceSettings) -> None:
    ids = documents.with_format("arrow").data.column("input_ids").combine_chunks().flatten()
    if len(ids) == 0:
        return
    low, high = pyarrow.compute.min(ids).as_py(), pyarrow.compute.max(ids).as_py()
    if low < 0 or high >= vocab_size:
        raise ConfigError(
            f"{source.setting_prefix}.token_field={source.token_field!r} holds token ids in [{low}, {high}], outside "
            f"the vocabulary of data.corpus.tokenizer (0..{vocab_size - 1}); point data.corpus.tokenizer at the "
            "tokenizer that produced them"
        )


def _write_tokens(documents: datasets.Dataset, path: Path, dtype: np.dtype) -> np.ndarray:
    lengths = []
    with open(path, "wb") as handle:
        for table in documents.with_format("arrow").iter(batch_size=_WRITE_BATCH_DOCS):
            column = table.column("input_ids").combine_chunks()
            column.flatten().to_numpy().astype(dtype).tofile(handle)
            lengths.append(pyarrow.compute.list_value_length(column).to_numpy(zero_copy_only=False))
        handle.flush()
        os.fsync(handle.fileno())
    return np.concatenate(lengths).astype(np.int64) if lengths else np.empty(0, np.int64)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes ``payload`` as indented JSON and fsyncs it (the caller renames the directory into place)."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
