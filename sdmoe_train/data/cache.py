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
from tokenizers import Tokenizer

from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.documents import load_documents
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
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        dtype = np.dtype(manifest["dtype"])
        tokens = {}
        for split in SPLITS:
            file = path / manifest["splits"][split]["file"]
            num_tokens = manifest["splits"][split]["num_tokens"]
            if file.stat().st_size != num_tokens * dtype.itemsize:
                raise ConfigError(
                    f"token cache {path} is corrupt: {file.name} has {file.stat().st_size} bytes, "
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


def cache_fingerprint(config: DataConfig, tokenizer: Tokenizer) -> str:
    """Hashes everything the cached token streams depend on.

    Args:
        config: Data settings; local files must exist.
        tokenizer: The tokenizer that will encode the documents.

    Returns:
        16 hex digits naming the cache directory.
    """
    payload = {
        "format_version": CACHE_FORMAT_VERSION,
        "sources": _sources(config),
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest(),
        "val_fraction": config.val_fraction,
        "shuffle_seed": config.shuffle_seed,
    }
    # A .txt file is one document whatever text_field says, so it only matters for other formats.
    if config.file_format != "text":
        payload["text_field"] = config.text_field
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _sources(config: DataConfig) -> list[dict[str, Any]]:
    if config.dataset_name is not None:
        return [{"dataset_name": config.dataset_name, "config": config.dataset_config_name, "split": config.split}]
    sources = []
    for file in config.resolve_files():
        stat = file.stat()
        sources.append({"path": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return sources


def token_cache_path(config: DataConfig, tokenizer: Tokenizer) -> Path:
    """Returns the directory that holds (or will hold) the cache for these settings."""
    return Path(config.cache_dir).expanduser() / cache_fingerprint(config, tokenizer)


def load_token_cache(config: DataConfig, tokenizer: Tokenizer) -> TokenCache:
    """Opens the existing cache for these settings without building it.

    Raises:
        ConfigError: If it has not been built.
    """
    path = token_cache_path(config, tokenizer)
    if not (path / MANIFEST_FILE).is_file():
        raise ConfigError(
            f"no token cache at {path} for data.corpus.data_files={config.data_files} / "
            f"data.corpus.dataset_name={config.dataset_name!r}; build it first with "
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


def build_token_cache(config: DataConfig, tokenizer: Tokenizer) -> TokenCache:
    """Builds the token cache for ``config``, or reuses it if one with the same fingerprint exists.

    Documents are tokenized with ``Dataset.map(num_proc=config.num_proc)``; EOS follows every
    document; documents are split into train/validation by :func:`split_documents`, and each split
    is written in document order as one flat array.

    Args:
        config: Data settings.
        tokenizer: The tokenizer; its fingerprint is part of the cache name.

    Returns:
        The opened cache.

    Raises:
        ConfigError: If files are missing or the text column does not exist.
    """
    fingerprint = cache_fingerprint(config, tokenizer)
    final = Path(config.cache_dir).expanduser() / fingerprint
    if (final / MANIFEST_FILE).is_file():
        return TokenCache.open(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{fingerprint}.", suffix=".partial", dir=final.parent))
    # mkdtemp makes the directory private (0700); the finished cache is readable like other outputs.
    staging.chmod(0o755)
    try:
        manifest = _build(config, tokenizer, fingerprint, staging)
        _write_json(staging / MANIFEST_FILE, manifest)
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


def _build(config: DataConfig, tokenizer: Tokenizer, fingerprint: str, staging: Path) -> dict[str, Any]:
    scratch = staging / "hf"
    eos_id = eos_token_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    # uint16 holds ids 0..65535, halving the cache (and page cache) of the common vocabularies.
    dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    documents = load_documents(config, streaming=False, cache_dir=scratch)
    assert isinstance(documents, datasets.Dataset), "non-streaming loading returns a Dataset"
    num_proc = min(config.num_proc, len(documents))
    tokenized = documents.map(
        _encode_batch,
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "eos_id": eos_id},
        remove_columns=["text"],
        cache_file_name=str(scratch / "tokenized.arrow"),
        # Naming the result ourselves spares datasets from hashing the tokenizer object.
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )
    splits = {}
    for split, indices in zip(
        SPLITS, split_documents(len(tokenized), config.val_fraction, config.shuffle_seed), strict=True
    ):
        file = f"{split}.bin"
        num_tokens = _write_tokens(tokenized.select(indices), staging / file, dtype)
        splits[split] = {"file": file, "num_tokens": num_tokens, "num_docs": len(indices)}
    shutil.rmtree(scratch)
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        "val_fraction": config.val_fraction,
        "shuffle_seed": config.shuffle_seed,
        "sources": _sources(config),
        "splits": splits,
    }


def _encode_batch(batch: dict[str, list], tokenizer: Tokenizer, eos_id: int) -> dict[str, list[list[int]]]:
    return {"input_ids": encode_documents(tokenizer, batch["text"], eos_id)}


def _write_tokens(documents: datasets.Dataset, path: Path, dtype: np.dtype) -> int:
    num_tokens = 0
    with open(path, "wb") as handle:
        for table in documents.with_format("arrow").iter(batch_size=_WRITE_BATCH_DOCS):
            ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
            ids.astype(dtype).tofile(handle)
            num_tokens += len(ids)
        handle.flush()
        os.fsync(handle.fileno())
    return num_tokens


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
