"""Already-tokenized sources (``token_field``): parquet or ``save_to_disk`` datasets with an ``input_ids``
column go into the token cache without tokenizing, exactly as their text would."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdmoe_train.data import cache
from sdmoe_train.data.cache import build_token_cache
from sdmoe_train.data.config import CorpusSource, DataConfig
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.data.tokenizer import encode_documents, eos_token_id, train_corpus_tokenizer
from sdmoe_train.errors import ConfigError
from tests.corpora import fake_trainer, make_config


def _token_ids(tokenizer, documents: list[str], with_eos: bool) -> list[list[int]]:
    ids = encode_documents(tokenizer, documents, eos_token_id(tokenizer))
    return ids if with_eos else [document[:-1] for document in ids]


def _write(directory: Path, fmt: str, ids: list[list[int]]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.table({"input_ids": ids, "id": list(range(len(ids)))}), directory / "ids.parquet")
        return str(directory / "*.parquet")
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(directory / "saved"))
    return str(directory / "saved" / "*.arrow")


@pytest.mark.parametrize("fmt", ["parquet", "save_to_disk"])
@pytest.mark.parametrize("with_eos", [True, False], ids=["ending_with_eos", "without_eos"])
def test_token_ids_give_the_cache_of_their_text(
    tmp_path: Path, corpus, fmt: str, with_eos: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    documents, pattern, tokenizer_path, tokenizer = corpus
    from_text = build_token_cache(make_config(tmp_path, pattern, tokenizer_path), tokenizer)
    ids_pattern = _write(tmp_path / "ids", fmt, _token_ids(tokenizer, documents, with_eos))
    config = make_config(tmp_path, ids_pattern, tokenizer_path, token_field="input_ids", cache_dir=str(tmp_path / "c2"))

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("pre-tokenized documents were tokenized")

    monkeypatch.setattr(cache, "encode_documents", no_tokenizing)
    from_ids = build_token_cache(config, tokenizer)
    np.testing.assert_array_equal(from_ids.train_tokens, from_text.train_tokens)
    np.testing.assert_array_equal(from_ids.val_tokens, from_text.val_tokens)


def test_a_mixture_can_mix_text_and_token_sources(tmp_path: Path, corpus) -> None:
    documents, pattern, tokenizer_path, tokenizer = corpus
    ids_pattern = _write(tmp_path / "ids", "parquet", _token_ids(tokenizer, documents[:6], True))
    shared = DataConfig(tokenizer=str(tokenizer_path), seq_len=16, cache_dir=str(tmp_path / "cache"), num_proc=1)
    sources = [
        CorpusSource(name="text", data_files=[pattern]),
        CorpusSource(name="ids", data_files=[ids_pattern], token_field="input_ids"),
    ]
    data = PretrainDataModule(shared, batch_size=2, corpora=sources)
    data.trainer = fake_trainer(0, 1)
    data.prepare_data()
    data.setup("fit")
    assert next(iter(data.train_dataloader())).shape == (2, 17)
    assert data.validation_sources == ["text", "ids"]


def test_ids_outside_the_vocabulary_name_the_range_and_the_fix(tmp_path: Path, corpus) -> None:
    _, _, tokenizer_path, tokenizer = corpus
    ids_pattern = _write(tmp_path / "ids", "parquet", [[1, 2, 3], [4, 5000]])
    config = make_config(tmp_path, ids_pattern, tokenizer_path, token_field="input_ids")
    with pytest.raises(
        ConfigError, match=r"token_field='input_ids' holds token ids in \[1, 5000\], outside .*0\.\.299"
    ):
        build_token_cache(config, tokenizer)


def test_missing_token_column_lists_the_columns(tmp_path: Path, corpus) -> None:
    _, _, tokenizer_path, tokenizer = corpus
    ids_pattern = _write(tmp_path / "ids", "parquet", [[1, 2, 3]])
    config = make_config(tmp_path, ids_pattern, tokenizer_path, token_field="tokens")
    with pytest.raises(ConfigError, match=r"data\.corpus\.token_field='tokens' is not a column .*'input_ids'"):
        build_token_cache(config, tokenizer)


def test_no_new_tokenizer_is_trained_for_token_ids(tmp_path: Path) -> None:
    config = DataConfig(tokenizer=str(tmp_path / "new.json"))
    source = CorpusSource(name="ids", data_files=["ids/*.parquet"], token_field="input_ids")
    with pytest.raises(ConfigError, match=r"data\.corpora\[ids\] hold token ids, .* instead of training a new one"):
        train_corpus_tokenizer(config, tmp_path / "new.json", [source])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"data_files": ["a/*.txt"], "token_field": "input_ids"}, r"token_field='input_ids' needs files with columns"),
        ({"data_files": ["a/*.parquet"], "token_field": ""}, r"token_field='' must name a column"),
        (
            {"data_files": ["a/*.parquet"], "token_field": "input_ids", "streaming": True},
            r"streaming=true with data\.corpus\.token_field='input_ids'",
        ),
    ],
)
def test_invalid_token_settings_are_rejected(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DataConfig(**settings)


def test_token_field_is_part_of_the_cache_fingerprint(tmp_path: Path, corpus) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    ids_pattern = str(tmp_path / "ids" / "*.parquet")
    _write(tmp_path / "ids", "parquet", [[1, 2]])
    config = make_config(tmp_path, ids_pattern, tokenizer_path, token_field="input_ids")
    assert cache.cache_fingerprint(config, tokenizer) != cache.cache_fingerprint(
        replace(config, token_field="ids"), tokenizer
    )
