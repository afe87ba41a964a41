"""Typed configuration of the pretraining data: where documents come from, tokenizer, packing and caching.

``__post_init__`` checks everything that can be checked from the recipe alone. Whether the files
exist is checked by :meth:`DataConfig.resolve_files` at prepare time, because recipes are parsed on
machines (login nodes, CI) where the corpus is not present.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdmoe_train.errors import ConfigError

DataFormat = Literal["text", "json", "parquet"]
"""Name of the ``datasets`` packaged builder that reads a local file format."""

FORMAT_BY_SUFFIX: dict[str, DataFormat] = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""File extensions accepted in ``data_files`` and the builder that reads each."""


def data_format(patterns: list[str], owner: str = "data.corpus.data_files") -> DataFormat:
    """Infers the shared format of local files (or glob patterns) from their extensions.

    Args:
        patterns: File paths or glob patterns, each ending in a known extension.
        owner: Name of the setting the patterns came from, used in error messages.

    Returns:
        The ``datasets`` builder name: ``"text"``, ``"json"`` or ``"parquet"``.

    Raises:
        ConfigError: If a pattern has an unknown extension or the patterns mix formats.
    """
    formats: dict[DataFormat, str] = {}
    for pattern in patterns:
        suffix = Path(pattern).suffix.lower()
        if suffix not in FORMAT_BY_SUFFIX:
            raise ConfigError(
                f"{owner} entry {pattern!r} must end in one of {sorted(FORMAT_BY_SUFFIX)} "
                "so that its format is known (for example 'corpus/*.jsonl')"
            )
        formats.setdefault(FORMAT_BY_SUFFIX[suffix], pattern)
    if len(formats) > 1:
        examples = ", ".join(f"{pattern!r} ({fmt})" for fmt, pattern in formats.items())
        raise ConfigError(f"{owner} mixes formats: {examples}; all files must share one format")
    return next(iter(formats))


def resolve_data_files(patterns: list[str], owner: str = "data.corpus.data_files") -> list[Path]:
    """Expands file paths and glob patterns (``**`` included) into existing files.

    Args:
        patterns: File paths or glob patterns; ``~`` is expanded.
        owner: Name of the setting the patterns came from, used in error messages.

    Returns:
        Absolute paths, sorted within each pattern, in pattern order, without duplicates.

    Raises:
        ConfigError: Naming the first pattern that matches no file.
    """
    resolved: dict[Path, None] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(Path(m).resolve() for m in glob.glob(expanded, recursive=True) if Path(m).is_file())
        if not matches:
            raise ConfigError(
                f"{owner} entry {pattern!r} matches no file (working directory {Path.cwd()}); "
                "fix the path or install the demo corpus with `sdmoe-train demo-corpus DEST`"
            )
        resolved.update(dict.fromkeys(matches))
    return list(resolved)


@dataclass(kw_only=True)
class DataConfig:
    """Source documents, tokenizer, packing into training examples and the on-disk token cache."""

    data_files: list[str] = field(default_factory=list)
    """Local files or glob patterns (.txt, .jsonl/.json or .parquet, one format for all)."""
    dataset_name: str | None = None
    """Named Hugging Face hub dataset (needs network access); use instead of data_files."""
    dataset_config_name: str | None = None
    """Configuration (subset) of the hub dataset, if it has several."""
    split: str = "train"
    """Split of the hub dataset to read; validation is carved out of it."""
    text_field: str = "text"
    """Column holding the document text in json/parquet/hub data; a .txt file is one document."""
    tokenizer: str = "data/tokenizer.json"
    """Path to a tokenizer.json file or to a directory holding one (a pretrained HF tokenizer)."""
    vocab_size: int = 4096
    """Vocabulary of a newly trained tokenizer, including <|endoftext|> (unused when loading one)."""
    seq_len: int = 256
    """Tokens per training example; each example holds seq_len + 1 tokens (inputs and shifted targets)."""
    cache_dir: str = "data/cache"
    """Directory of token caches; each cache lives in a subdirectory named by its input fingerprint."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (token cache mode), in [0, 1)."""
    num_proc: int = 2
    """Worker processes that tokenize documents while building the cache."""
    streaming: bool = False
    """Tokenize on the fly while training instead of building a token cache (corpora larger than the disk)."""
    streaming_val_docs: int = 100
    """Streaming only: the first N documents of the stream are held out for validation."""
    shuffle_seed: int = 1234
    """Seed of the train/validation split, the per-epoch example order and the streaming shuffle."""
    shuffle_buffer: int = 10000
    """Streaming only: documents in the shuffle buffer; 0 reads documents in file order."""

    def __post_init__(self) -> None:
        if bool(self.data_files) == (self.dataset_name is not None):
            raise ConfigError(
                f"data.corpus.data_files={self.data_files} and data.corpus.dataset_name={self.dataset_name!r}: "
                "give exactly one of them (local files or a hub dataset name)"
            )
        if self.data_files:
            data_format(self.data_files)
        for name in ("split", "text_field", "tokenizer", "cache_dir"):
            if not getattr(self, name):
                raise ConfigError(f"data.corpus.{name}={getattr(self, name)!r} must not be empty")
        # 256 byte-level symbols plus <|endoftext|>: a smaller vocabulary cannot represent all text.
        if self.vocab_size < 257:
            raise ConfigError(f"data.corpus.vocab_size={self.vocab_size} must be >= 257 (256 bytes + <|endoftext|>)")
        if self.seq_len < 1:
            raise ConfigError(f"data.corpus.seq_len={self.seq_len} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.corpus.val_fraction={self.val_fraction} must lie in [0, 1)")
        if self.num_proc < 1:
            raise ConfigError(f"data.corpus.num_proc={self.num_proc} must be >= 1")
        for name in ("streaming_val_docs", "shuffle_seed", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ConfigError(f"data.corpus.{name}={getattr(self, name)} must be >= 0")

    @property
    def file_format(self) -> DataFormat | None:
        """The ``datasets`` builder for ``data_files``; None for a hub dataset."""
        return data_format(self.data_files) if self.data_files else None

    def resolve_files(self) -> list[Path]:
        """Expands ``data_files`` into existing files (empty for a hub dataset).

        Returns:
            Absolute file paths, sorted within each pattern, without duplicates.

        Raises:
            ConfigError: Naming the first pattern that matches no file.
        """
        return resolve_data_files(self.data_files)
