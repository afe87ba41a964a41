"""Loads documents with Hugging Face ``datasets`` into a table with a single ``text`` column.

A .txt file is one document (``sample_by="document"``), so a play or a book is never cut at
line breaks; json/parquet rows and hub dataset rows are one document each.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

import datasets

from sdmoe_train.data.config import DataFormat, SourceSettings
from sdmoe_train.errors import ConfigError

Documents: TypeAlias = datasets.Dataset | datasets.IterableDataset


def load_file_documents(
    files: Sequence[Path],
    fmt: DataFormat,
    text_field: str,
    *,
    streaming: bool,
    cache_dir: Path | None = None,
    owner: str = "data.corpus",
) -> Documents:
    """Reads local files into documents.

    Args:
        files: Existing files of one format, in the order their documents should appear.
        fmt: The ``datasets`` builder that reads them.
        text_field: Column holding the text (ignored for .txt, whose column is always ``text``).
        streaming: Read lazily as an ``IterableDataset`` instead of converting to Arrow first.
        cache_dir: Where ``datasets`` writes its Arrow copy (non-streaming); None uses its default.
        owner: Recipe section of these settings, for error messages.

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
    return _text_column(documents, "text" if fmt == "text" else text_field, owner)


def load_documents(source: SourceSettings, *, streaming: bool, cache_dir: Path | None = None) -> Documents:
    """Reads the documents of one source: local files or a hub dataset.

    Args:
        source: The single corpus (``data.corpus``) or one source of a mixture (``data.corpora``);
            ``data_files`` must resolve to existing files.
        streaming: Read lazily as an ``IterableDataset``.
        cache_dir: Where ``datasets`` writes the Arrow copy of local files (non-streaming); hub
            downloads always go to the ``datasets`` cache (``HF_HOME``) so they are not fetched twice.

    Returns:
        A dataset whose only column is ``text``.

    Raises:
        ConfigError: If a file pattern matches nothing or the text column is missing.
    """
    if source.dataset_name is None:
        assert source.file_format is not None, "a source without dataset_name has data_files"
        return load_file_documents(
            source.resolve_files(),
            source.file_format,
            source.text_field,
            streaming=streaming,
            cache_dir=cache_dir,
            owner=source.setting_prefix,
        )
    documents = datasets.load_dataset(
        source.dataset_name, source.dataset_config_name, split=source.split, streaming=streaming
    )
    return _text_column(documents, source.text_field, source.setting_prefix)


def _text_column(documents: Documents, text_field: str, owner: str) -> Documents:
    columns = documents.column_names
    # A streaming reader may not know its columns before the first row (columns is None); a missing
    # column then surfaces from ``datasets`` when the first document is read.
    if columns is not None and text_field not in columns:
        raise ConfigError(f"{owner}.text_field={text_field!r} is not a column of the documents (columns: {columns})")
    if columns == ["text"] or (columns is None and text_field == "text"):
        return documents
    documents = documents.select_columns([text_field])
    return documents if text_field == "text" else documents.rename_column(text_field, "text")
