"""Typed configuration of the pretraining data: where documents come from, tokenizer, packing and caching.

``__post_init__`` checks everything that can be checked from the recipe alone. Whether the files
exist is checked by :meth:`DataConfig.resolve_files` at prepare time, because recipes are parsed on
machines (login nodes, CI) where the corpus is not present.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdmoe_train.errors import ConfigError

DataFormat = Literal["text", "json", "parquet", "arrow"]
"""Name of the ``datasets`` packaged builder that reads a local file format."""

FORMAT_BY_SUFFIX: dict[str, DataFormat] = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
"""File extensions accepted in ``data_files`` and the builder that reads each (``.arrow``: the shards of a
Hugging Face dataset written by ``save_to_disk``)."""


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


SOURCE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""Allowed source names: they become metric keys (``data/tokens/<name>``) and directory names."""

SINGLE_CORPUS_NAME = "corpus"
"""Name of the only source of a recipe that sets ``data.corpus`` instead of ``data.corpora``."""


@dataclass(kw_only=True)
class SourceSettings:
    """Where the documents of one source come from: local files or a Hugging Face hub dataset."""

    data_files: list[str] = field(default_factory=list)
    """Local files or glob patterns (.txt, .jsonl/.json, .parquet or .arrow, one format for all)."""
    dataset_name: str | None = None
    """Named Hugging Face hub dataset (needs network access); use instead of data_files."""
    dataset_config_name: str | None = None
    """Configuration (subset) of the hub dataset, if it has several."""
    split: str = "train"
    """Split of the hub dataset to read; validation is carved out of it."""
    text_field: str = "text"
    """Column holding the document text in json/parquet/hub data; a .txt file is one document."""
    token_field: str | None = None
    """Column of already-tokenized documents (e.g. ``input_ids``) instead of text: the ids are used as they
    are (EOS appended where a document lacks it), so they must come from ``data.corpus.tokenizer``."""

    @property
    def setting_prefix(self) -> str:
        """Where these settings live in a recipe, for error messages (``data.corpus``)."""
        return "data.corpus"

    @property
    def has_source(self) -> bool:
        """Whether files or a hub dataset are named."""
        return bool(self.data_files) or self.dataset_name is not None

    def _check_source(self) -> None:
        prefix = self.setting_prefix
        if self.data_files and self.dataset_name is not None:
            raise ConfigError(
                f"{prefix}.data_files={self.data_files} and {prefix}.dataset_name={self.dataset_name!r}: "
                "give exactly one of them (local files or a hub dataset name)"
            )
        if self.data_files:
            data_format(self.data_files, owner=f"{prefix}.data_files")
        for name in ("split", "text_field"):
            if not getattr(self, name):
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)!r} must not be empty")
        if self.token_field is not None:
            if not self.token_field:
                raise ConfigError(f"{prefix}.token_field='' must name a column (or be null for text documents)")
            if self.data_files and self.file_format == "text":
                raise ConfigError(
                    f"{prefix}.token_field={self.token_field!r} needs files with columns (.jsonl, .parquet, "
                    "or the .arrow shards of save_to_disk); a .txt file holds text"
                )

    @property
    def file_format(self) -> DataFormat | None:
        """The ``datasets`` builder for ``data_files``; None for a hub dataset."""
        return data_format(self.data_files, owner=f"{self.setting_prefix}.data_files") if self.data_files else None

    def resolve_files(self) -> list[Path]:
        """Expands ``data_files`` into existing files (empty for a hub dataset).

        Returns:
            Absolute file paths, sorted within each pattern, without duplicates.

        Raises:
            ConfigError: Naming the first pattern that matches no file.
        """
        return resolve_data_files(self.data_files, owner=f"{self.setting_prefix}.data_files")


@dataclass(kw_only=True)
class CorpusSource(SourceSettings):
    """One source of a mixture (``data.corpora``): its documents and its share of the training examples.

    Tokenizer, sequence length, cache, validation share and seeds are shared by all sources and set
    once in ``data.corpus``.
    """

    name: str
    """Identifier in logs (``data/tokens/<name>``, ``val/loss/<name>``), checkpoints and prepared data."""
    weight: float = 1.0
    """Share of the training examples drawn from this source, relative to the other weights (> 0)."""

    @property
    def setting_prefix(self) -> str:
        return f"data.corpora[{self.name}]"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not SOURCE_NAME_PATTERN.fullmatch(self.name):
            raise ConfigError(
                f"data.corpora entry name={self.name!r} must start with a letter or digit and contain only "
                "letters, digits, '_', '.' and '-' (it names metrics and directories), e.g. 'shakespeare'"
            )
        if not self.has_source:
            raise ConfigError(
                f"{self.setting_prefix} has no documents: give data_files (local files or glob patterns) "
                "or dataset_name (a Hugging Face hub dataset)"
            )
        self._check_source()
        if not math.isfinite(self.weight) or self.weight <= 0:
            raise ConfigError(
                f"{self.setting_prefix}.weight={self.weight} must be a positive finite number "
                "(weights are relative shares of the training examples; leave a source out to give it none)"
            )


@dataclass(kw_only=True)
class DataConfig(SourceSettings):
    """Source documents, tokenizer, packing into training examples and the on-disk token cache.

    With a single corpus, the source fields (``data_files`` or ``dataset_name``, ``text_field``, ...) name
    its documents. A mixture lists its sources in ``data.corpora`` instead and leaves them empty here;
    everything else in this section is shared by all sources.
    """

    tokenizer: str = "data/tokenizer.json"
    """Path to a tokenizer.json file or to a directory holding one (a pretrained HF tokenizer)."""
    vocab_size: int = 4096
    """Vocabulary of a newly trained tokenizer, including <|endoftext|> (unused when loading one)."""
    seq_len: int = 256
    """Tokens per training example; each example holds seq_len + 1 tokens (inputs and shifted targets)."""
    cache_dir: str = "data/cache"
    """Directory of token caches; each cache lives in a subdirectory named by its input fingerprint."""
    val_fraction: float = 0.02
    """Share of documents held out for validation (token cache mode), in [0, 1); per source in a mixture."""
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
        # Whether a source is named at all is checked by the data module, which also knows data.corpora.
        self._check_source()
        for name in ("tokenizer", "cache_dir"):
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
        if self.streaming and self.token_field is not None:
            raise ConfigError(
                f"data.corpus.streaming=true with data.corpus.token_field={self.token_field!r}: streaming tokenizes "
                "text while training; already-tokenized documents go through the token cache (`sdmoe-train prepare`)"
            )

    def require_source(self) -> None:
        """Raises unless this section names documents itself (a single-corpus recipe).

        Raises:
            ConfigError: If neither data_files nor dataset_name is set.
        """
        if not self.has_source:
            raise ConfigError(
                f"data.corpus.data_files={self.data_files} and data.corpus.dataset_name={self.dataset_name!r}: "
                "give exactly one of them (local files or a hub dataset name), or list the sources of a mixture "
                "in data.corpora"
            )
