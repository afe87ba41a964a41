"""DataConfig validation: every bad setting fails at parse time (or prepare time for files) naming itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdmoe_train.data.config import CorpusSource, DataConfig
from sdmoe_train.errors import ConfigError


def test_neither_source_is_rejected_unless_a_mixture_names_the_documents() -> None:
    shared_settings_only = DataConfig()  # valid: the shared section of a mixture
    with pytest.raises(
        ConfigError, match=r"data\.corpus\.data_files=\[\] and data\.corpus\.dataset_name=None.*exactly one"
    ):
        shared_settings_only.require_source()


def test_both_sources_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data\.corpus\.dataset_name='wikitext'.*exactly one"):
        DataConfig(data_files=["corpus/*.txt"], dataset_name="wikitext")


def test_mixed_formats_are_rejected_naming_each_format() -> None:
    with pytest.raises(
        ConfigError, match=r"mixes formats: 'a/\*\.txt' \(text\), 'b/\*\.jsonl' \(json\), 'b/\*\.parquet'"
    ):
        DataConfig(data_files=["a/*.txt", "b/*.jsonl", "b/*.parquet"])


def test_json_and_jsonl_share_a_format() -> None:
    assert DataConfig(data_files=["a/*.json", "b/*.jsonl"]).file_format == "json"


def test_unknown_extension_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'corpus/\*\.csv' must end in one of"):
        DataConfig(data_files=["corpus/*.csv"])


def test_missing_files_are_only_checked_when_resolved(tmp_path: Path) -> None:
    config = DataConfig(data_files=[str(tmp_path / "absent" / "*.txt")])
    with pytest.raises(ConfigError, match=r"data\.corpus\.data_files entry '.*absent/\*\.txt' matches no file"):
        config.resolve_files()


def test_resolve_files_sorts_each_pattern_and_drops_duplicates(tmp_path: Path) -> None:
    for name in ("b.txt", "a.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    config = DataConfig(data_files=[str(tmp_path / "*.txt"), str(tmp_path / "**" / "*.txt")])
    names = [path.relative_to(tmp_path).as_posix() for path in config.resolve_files()]
    assert names == ["a.txt", "b.txt", "sub/c.txt"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_len", 0),
        ("val_fraction", 1.0),
        ("val_fraction", -0.1),
        ("num_proc", 0),
        ("vocab_size", 200),
        ("shuffle_buffer", -1),
        ("shuffle_seed", -3),
        ("streaming_val_docs", -1),
    ],
)
def test_invalid_values_name_field_and_value(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"data\.corpus\.{field}={value}"):
        DataConfig(data_files=["corpus/*.txt"], **{field: value})


def test_empty_strings_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"data\.corpus\.text_field='' must not be empty"):
        DataConfig(data_files=["corpus/*.jsonl"], text_field="")


# --- mixture sources -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "web", "weight": 0.0}, r"data\.corpora\[web\]\.weight=0\.0 must be a positive finite number"),
        ({"name": "web", "weight": -1.0}, r"data\.corpora\[web\]\.weight=-1\.0 must be a positive finite number"),
        ({"name": "web", "weight": float("nan")}, r"weight=nan must be a positive finite number"),
        ({"name": "web", "weight": float("inf")}, r"weight=inf must be a positive finite number"),
        ({"name": "web/x"}, r"name='web/x' must start with a letter or digit"),
        ({"name": ""}, r"name='' must start with a letter or digit"),
        ({"name": "web", "data_files": []}, r"data\.corpora\[web\] has no documents: give data_files"),
        ({"name": "web", "dataset_name": "wikitext"}, r"data\.corpora\[web\]\.data_files=.* give exactly one"),
        ({"name": "web", "data_files": ["a/*.csv"]}, r"data\.corpora\[web\]\.data_files entry 'a/\*\.csv'"),
        ({"name": "web", "data_files": ["a/*.txt", "b/*.jsonl"]}, r"data\.corpora\[web\]\.data_files mixes"),
        ({"name": "web", "text_field": ""}, r"data\.corpora\[web\]\.text_field='' must not be empty"),
    ],
)
def test_invalid_mixture_sources_name_the_source_and_setting(settings: dict, message: str) -> None:
    settings = {"data_files": ["corpus/*.txt"], **settings}
    with pytest.raises(ConfigError, match=message):
        CorpusSource(**settings)


def test_mixture_source_files_are_resolved_with_the_source_named(tmp_path: Path) -> None:
    source = CorpusSource(name="books", data_files=[str(tmp_path / "missing" / "*.txt")])
    with pytest.raises(ConfigError, match=r"data\.corpora\[books\]\.data_files entry .* matches no file"):
        source.resolve_files()
