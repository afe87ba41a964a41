"""Loads documents with Hugging Face ``datasets`` into a table with a single ``text`` column.

A .txt file is one document (``sample_by="document"``), so a play or a book is never cut at
line breaks; json/parquet/arrow rows and hub dataset rows are one document each. A pre-tokenized
source (``token_field``) gives a single ``input_ids`` column instead.

Bad input is named, never a traceback from inside ``datasets``: a file that cannot be read (invalid
UTF-8, a malformed JSON line, a damaged parquet file) by file and line or byte, a text column of the
wrong type by setting, file and row. Rows without text (the field missing or null) are skipped and
counted: :func:`check_text_column` reports how many and where the first one is, and refuses a source
in which no row has text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet

from sdmoe_train.data.config import DataFormat, SourceSettings
from sdmoe_train.errors import ConfigError

log = logging.getLogger(__name__)

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
    try:
        documents = datasets.load_dataset(
            fmt,
            data_files=[str(file) for file in files],
            split="train",
            streaming=streaming,
            cache_dir=None if cache_dir is None else str(cache_dir),
            **extra,
        )
    except Exception as error:
        named = unreadable_file_error(files, fmt, owner, error)
        if named is None or named is error:
            raise
        raise named from error
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


def unreadable_file_error(files: Sequence[Path], fmt: DataFormat, owner: str, error: Exception) -> ConfigError | None:
    """Names the file (and line or byte) that ``datasets`` failed to read; None if no file is at fault.

    Only called after a failure, so reading the files again to find the culprit costs nothing otherwise.

    Args:
        files: The files that were being read.
        fmt: Their format.
        owner: Recipe section of the source, for the message.
        error: What ``datasets`` raised.

    Returns:
        A :class:`ConfigError` naming the unreadable file (``error`` itself if it is one already), or None
        when every file reads cleanly: then the failure is not the data's fault and must surface as it is.
    """
    if isinstance(error, ConfigError):
        return error
    for file in files:
        problem = _file_problem(file, fmt)
        if problem is not None:
            return ConfigError(
                f"{owner}.data_files: {file} {problem}; fix the file (text files must be UTF-8: convert with "
                "e.g. `iconv -f latin1 -t utf-8`) or remove it from the pattern"
            )
    return None


def _file_problem(file: Path, fmt: DataFormat) -> str | None:
    try:
        if fmt == "text":
            data = file.read_bytes()
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as decode_error:
                line = data.count(b"\n", 0, decode_error.start) + 1
                return f"is not valid UTF-8 text (byte {decode_error.start}, line {line}: {decode_error.reason})"
        elif fmt == "json":
            with open(file, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as parse_error:
                        return f"line {number} is not valid JSON ({parse_error})"
                    if not isinstance(row, dict):
                        return f"line {number} is a JSON {type(row).__name__}, not an object with named fields"
        elif fmt == "parquet":
            pyarrow.parquet.read_table(file)
        else:
            with pa.memory_map(str(file)) as source:
                pa.ipc.open_stream(source).read_all()
    except UnicodeDecodeError as decode_error:
        return f"is not valid UTF-8 (byte {decode_error.start}: {decode_error.reason})"
    except (OSError, pa.ArrowException) as read_error:
        return f"cannot be read as {fmt} ({read_error})"
    return None


@dataclass(frozen=True)
class SkippedRows:
    """Rows of a source dropped because they hold no text (the text field missing or null)."""

    count: int
    """How many rows were dropped."""
    total: int
    """How many rows the source has."""
    first: str
    """Where the first one is: ``file line N`` for JSON lines, ``file row N`` otherwise."""

    def describe(self, owner: str, field: str) -> str:
        return (
            f"{owner}: skipped {self.count} of {self.total} rows without a {field!r} field (missing or null; "
            f"first: {self.first})"
        )


def check_text_column(
    documents: datasets.Dataset, source: SourceSettings, files: Sequence[Path]
) -> tuple[datasets.Dataset, SkippedRows | None]:
    """Checks the type of a loaded source's ``text`` column and drops its rows without text.

    Args:
        documents: A non-streaming dataset from :func:`load_documents` (text, not token ids).
        source: The source's settings, for messages.
        files: Its files (empty for a hub dataset), to say where a bad row is.

    Returns:
        The documents with text, and what was skipped (None when every row has text).

    Raises:
        ConfigError: If the column does not hold strings, or no row has text.
    """
    owner, field = source.setting_prefix, source.text_field
    feature = documents.features["text"]
    column = documents.with_format("arrow").data.column("text")
    if len(documents) > 0 and column.null_count == len(documents):
        raise ConfigError(
            f"{owner}.text_field={field!r}: none of the {len(documents)} rows has this field (all missing or null); "
            f"point {owner}.text_field at the column that holds the text"
        )
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        where = _first_non_text(files, source)
        raise ConfigError(
            f"{owner}.text_field={field!r} holds {_describe_feature(feature)} values, not text"
            f"{f' (first: {where})' if where else ''}; point {owner}.text_field at a column of strings, or "
            f"set {owner}.token_field for a column of token ids"
        )
    missing = column.null_count
    if missing == 0:
        return documents, None
    valid = column.is_valid()
    first_missing = int(np.flatnonzero(~np.asarray(valid))[0])
    skipped = SkippedRows(missing, len(documents), _row_location(files, source, first_missing))
    log.warning("%s", skipped.describe(owner, field))
    return documents.select(np.flatnonzero(np.asarray(valid))), skipped


def document_texts(documents: Iterable[dict[str, Any]], source: SourceSettings) -> Iterator[str]:
    """The texts of a (streaming) source: unreadable files named, rows without text skipped, other types refused.

    Args:
        documents: Rows with a ``text`` column, from :func:`load_documents`.
        source: The source's settings, for messages and to find a bad file.

    Yields:
        Each row's text, in order.

    Raises:
        ConfigError: If a file cannot be read or a row's text is not a string.
    """
    files = source.resolve_files() if source.dataset_name is None else []
    skipped = 0
    iterator = iter(documents)
    while True:
        try:
            document = next(iterator)
        except StopIteration:
            break
        except Exception as error:
            fmt = source.file_format
            named = None if fmt is None else unreadable_file_error(files, fmt, source.setting_prefix, error)
            if named is None or named is error:
                raise
            raise named from error
        if "text" not in document:
            # A stream learns its columns from the first row; other sources are checked when loaded.
            raise ConfigError(
                f"{source.setting_prefix}.text_field={source.text_field!r} is not a column of the documents "
                f"(columns: {sorted(document)})"
            )
        text = document["text"]
        if isinstance(text, str):
            yield text
        elif text is None:
            skipped += 1
            if skipped == 1:
                log.warning(
                    "%s: skipping rows without a %r field (missing or null)", source.setting_prefix, source.text_field
                )
        else:
            raise ConfigError(
                f"{source.setting_prefix}.text_field={source.text_field!r} holds a {type(text).__name__} value, "
                f"not text; point {source.setting_prefix}.text_field at a column of strings"
            )


def _describe_feature(feature: Any) -> str:
    if isinstance(feature, datasets.Value):
        return feature.dtype
    if type(feature).__name__ == "Json":
        return "mixed-type (JSON)"
    return type(feature).__name__


def _first_non_text(files: Sequence[Path], source: SourceSettings) -> str | None:
    field = source.text_field
    for file in files:
        if source.file_format == "json":
            for number, row in _json_rows(file):
                value = row.get(field)
                if value is not None and not isinstance(value, str):
                    return f"{file} line {number}: {type(value).__name__} {str(value)[:40]!r}"
        elif source.file_format == "parquet":
            schema = pyarrow.parquet.read_schema(file)
            if (
                field in schema.names
                and not pa.types.is_string(schema.field(field).type)
                and not (pa.types.is_large_string(schema.field(field).type))
            ):
                return f"{file}, column type {schema.field(field).type}"
    return None


def _row_location(files: Sequence[Path], source: SourceSettings, row: int) -> str:
    """Where row ``row`` (counted over all files in order) lives: file and line (JSON lines) or row."""
    if source.file_format == "json":
        seen = 0
        for file in files:
            for number, _ in _json_rows(file):
                if seen == row:
                    return f"{file} line {number}"
                seen += 1
    elif source.file_format == "parquet":
        start = 0
        for file in files:
            rows = pyarrow.parquet.read_metadata(file).num_rows
            if row < start + rows:
                return f"{file} row {row - start + 1}"
            start += rows
    return f"row {row + 1}"


def _json_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, json.loads(line)
