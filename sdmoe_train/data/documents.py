"""Loads documents with Hugging Face ``datasets`` into a table with a single ``text`` column.

A .txt file is one document (``sample_by="document"``), so a play or a book is never cut at
line breaks; json/parquet rows and hub dataset rows are one document each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import datasets

from sdmoe_train.data.config import DataConfig, DataFormat
from sdmoe_train.errors import ConfigError

Documents: TypeAlias = datasets.Dataset | datasets.IterableDataset


def load_file_documents(
    files: Sequence[Path],
    fmt: DataFormat,
    text_field: str,
    *,
    streaming: bool,
    cache_dir: Path | None = None,
) -> Documents:
    """Reads local files into documents.

    Args:
        files: Existing files of one format, in the order their documents should appear.
        fmt: The ``datasets`` builder that reads them.
        text_field: Column holding the text (ignored for .txt, whose column is always ``text``).
        streaming: Read lazily as an ``IterableDataset`` instead of converting to Arrow first.
        cache_dir: Where ``datasets`` writes its Arrow copy (non-streaming); None uses its default.

    Returns:
        A dataset whose only column is ``text``.
    """
    extra = {"sample_by": "document"} if fmt == "text" else {}
    documents = datasets.load_dataset(
        fmt,
        data_files=[str(file) for file in files],
        split="train",
        streaming=streaming,
        cache_dir=None if cache_dir is None else str(cache_dir),
        **extra,
    )
    return _text_column(documents, "text" if fmt == "text" else text_field)


def load_documents(config: DataConfig, *, streaming: bool, cache_dir: Path | None = None) -> Documents:
    """Reads the documents named by ``config``: local files or a hub dataset.

    Args:
        config: Data settings; ``data_files`` must resolve to existing files.
        streaming: Read lazily as an ``IterableDataset``.
        cache_dir: Where ``datasets`` writes the Arrow copy of local files (non-streaming); hub
            downloads always go to the ``datasets`` cache (``HF_HOME``) so they are not fetched twice.

    Returns:
        A dataset whose only column is ``text``.

    Raises:
        ConfigError: If a file pattern matches nothing or the text column is missing.
    """
    if config.dataset_name is None:
        assert config.file_format is not None, "DataConfig guarantees data_files when dataset_name is None"
        return load_file_documents(
            config.resolve_files(), config.file_format, config.text_field, streaming=streaming, cache_dir=cache_dir
        )
    documents = datasets.load_dataset(
        config.dataset_name, config.dataset_config_name, split=config.split, streaming=streaming
    )
    return _text_column(documents, config.text_field)


def _text_column(documents: Documents, text_field: str) -> Documents:
    columns = documents.column_names
    # A streaming reader may not know its columns before the first row (columns is None); a missing
    # column then surfaces from ``datasets`` when the first document is read.
    if columns is not None and text_field not in columns:
        raise ConfigError(
            f"data.corpus.text_field={text_field!r} is not a column of the documents (columns: {columns})"
        )
    if columns == ["text"] or (columns is None and text_field == "text"):
        return documents
    documents = documents.select_columns([text_field])
    return documents if text_field == "text" else documents.rename_column(text_field, "text")
