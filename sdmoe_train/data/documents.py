"""Loads documents with Hugging Face ``datasets`` into a table with a single ``text`` column.

A .txt file is one document (``sample_by="document"``), so a play or a book is never cut at
line breaks; json/parquet/arrow rows and hub dataset rows are one document each. A pre-tokenized
source (``token_field``) gives a single ``input_ids`` column instead.
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
    token_field: str | None = None,
) -> Documents:
    """Reads local files into documents.

    Args:
        files: Existing files of one format, in the order their documents should appear.
        fmt: The ``datasets`` builder that reads them.
        text_field: Column holding the text (ignored for .txt, whose column is always ``text``).
        streaming: Read lazily as an ``IterableDataset`` instead of converting to Arrow first.
        cache_dir: Where ``datasets`` writes its Arrow copy (non-streaming); None uses its default.
        owner: Recipe section of these settings, for error messages.
        token_field: Column of token ids to read instead of text (a pre-tokenized source).

    Returns:
        A dataset whose only column is ``text``, or ``input_ids`` when ``token_field`` is set.
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
    return _only_column(documents, "text" if fmt == "text" else text_field, owner, token_field)


def load_documents(source: SourceSettings, *, streaming: bool, cache_dir: Path | None = None) -> Documents:
    """Reads the documents of one source: local files or a hub dataset.

    Args:
        source: The single corpus (``data.corpus``) or one source of a mixture (``data.corpora``);
            ``data_files`` must resolve to existing files.
        streaming: Read lazily as an ``IterableDataset``.
        cache_dir: Where ``datasets`` writes the Arrow copy of local files (non-streaming); hub
            downloads always go to the ``datasets`` cache (``HF_HOME``) so they are not fetched twice.

    Returns:
        A dataset whose only column is ``text``, or ``input_ids`` for a pre-tokenized source.

    Raises:
        ConfigError: If a file pattern matches nothing or the text (or token) column is missing.
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
            token_field=source.token_field,
        )
    documents = datasets.load_dataset(
        source.dataset_name, source.dataset_config_name, split=source.split, streaming=streaming
    )
    return _only_column(documents, source.text_field, source.setting_prefix, source.token_field)


def _only_column(documents: Documents, text_field: str, owner: str, token_field: str | None) -> Documents:
    field, setting, output = (
        (text_field, "text_field", "text") if token_field is None else (token_field, "token_field", "input_ids")
    )
    columns = documents.column_names
    # A streaming reader may not know its columns before the first row (columns is None); a missing
    # column then surfaces from ``datasets`` when the first document is read.
    if columns is not None and field not in columns:
        raise ConfigError(f"{owner}.{setting}={field!r} is not a column of the documents (columns: {columns})")
    if columns == [output] or (columns is None and field == output):
        return documents
    documents = documents.select_columns([field])
    return documents if field == output else documents.rename_column(field, output)
