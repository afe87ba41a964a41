"""Bad documents are named, not tracebacks: unreadable files by file and line or byte, text columns of the wrong
type by setting and file, rows without text skipped and counted (and refused when none has text), on every path
that reads documents: the token cache, the tokenizer trainer and the training stream."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdmoe_train.data.cache import build_token_cache
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.data.streaming import StreamingPackedBlocks
from sdmoe_train.data.tokenizer import train_tokenizer
from sdmoe_train.errors import ConfigError
from tests.corpora import fake_trainer, make_config, make_documents, make_tokenizer

DOCUMENTS = make_documents(count=6)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"), DOCUMENTS)


def _jsonl(path: Path, *rows: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    good = [json.dumps({"text": text}) for text in DOCUMENTS]
    path.write_text("\n".join([*good[:3], *rows, *good[3:]]) + "\n")
    return str(path.parent / "*.jsonl")


def _config(tmp_path: Path, pattern: str, tokenizer, **overrides: object):
    return make_config(tmp_path, pattern, tokenizer[0], text_field="text", **overrides)


def test_invalid_utf8_names_the_file_byte_and_line_when_caching_and_training_a_tokenizer(
    tmp_path: Path, tokenizer
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCUMENTS[0])
    (corpus / "b.txt").write_bytes(b"first line\nsecond \xff line\n")
    expected = r"data\.corpus\.data_files: .*b\.txt is not valid UTF-8 text \(byte 18, line 2"
    with pytest.raises(ConfigError, match=expected):
        build_token_cache(_config(tmp_path, str(corpus / "*.txt"), tokenizer), tokenizer[1])
    with pytest.raises(ConfigError, match=expected):
        train_tokenizer([str(corpus / "*.txt")], 300, tmp_path / "tok.json")


def test_malformed_jsonl_line_is_named_with_its_line_number(tmp_path: Path, tokenizer) -> None:
    pattern = _jsonl(tmp_path / "corpus" / "rows.jsonl", '{"text": "unterminated')
    with pytest.raises(ConfigError, match=r"rows\.jsonl line 4 is not valid JSON"):
        build_token_cache(_config(tmp_path, pattern, tokenizer), tokenizer[1])
    with pytest.raises(ConfigError, match=r"rows\.jsonl line 4 is not valid JSON"):
        train_tokenizer([pattern], 300, tmp_path / "tok.json")


def test_rows_without_text_are_skipped_counted_and_located(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    pattern = _jsonl(tmp_path / "corpus" / "rows.jsonl", '{"id": 7}', "", '{"text": null}')
    with caplog.at_level(logging.WARNING):
        cache = build_token_cache(_config(tmp_path, pattern, tokenizer), tokenizer[1])
    first = f"{tmp_path / 'corpus' / 'rows.jsonl'} line 4"
    assert cache.manifest["skipped_rows"] == {"count": 2, "total": 8, "first": first}
    assert f"skipped 2 of 8 rows without a 'text' field (missing or null; first: {first})" in caplog.text
    splits = cache.manifest["splits"]
    assert splits["train"]["num_docs"] + splits["validation"]["num_docs"] == len(DOCUMENTS)
    # No empty document (a lone EOS) stands in for a skipped row.
    eos = cache.eos_token_id
    stream = np.concatenate([np.asarray(cache.train_tokens), np.asarray(cache.val_tokens)])
    assert not np.any((stream[1:] == eos) & (stream[:-1] == eos))


def test_parquet_rows_without_text_are_located_by_file_and_row(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": DOCUMENTS[:3]}), tmp_path / "corpus" / "a.parquet")
    pq.write_table(pa.table({"text": [DOCUMENTS[3], None, DOCUMENTS[4]]}), tmp_path / "corpus" / "b.parquet")
    cache = build_token_cache(_config(tmp_path, str(tmp_path / "corpus" / "*.parquet"), tokenizer), tokenizer[1])
    assert cache.manifest["skipped_rows"] == {"count": 1, "total": 6, "first": f"{tmp_path}/corpus/b.parquet row 2"}


def test_a_corpus_without_any_text_is_refused(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "rows.jsonl").write_text('{"body": "a"}\n{"text": null}\n')
    with pytest.raises(ConfigError, match=r"text_field='text': none of the 2 rows has this field"):
        build_token_cache(_config(tmp_path, str(tmp_path / "corpus" / "*.jsonl"), tokenizer), tokenizer[1])


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        (list(range(6)), r"holds int64 values, not text \(first: .*a\.parquet, column type int64\)"),
        ([[1, 2]] * 6, r"holds List values, not text \(first: .*a\.parquet, column type list<"),
    ],
)
def test_parquet_text_column_of_another_type_is_refused(tmp_path: Path, tokenizer, column, expected: str) -> None:
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"text": column}), tmp_path / "corpus" / "a.parquet")
    with pytest.raises(ConfigError, match=r"data\.corpus\.text_field='text' " + expected + ".*token_field"):
        build_token_cache(_config(tmp_path, str(tmp_path / "corpus" / "*.parquet"), tokenizer), tokenizer[1])


def test_jsonl_text_of_mixed_types_names_the_first_bad_line(tmp_path: Path, tokenizer) -> None:
    pattern = _jsonl(tmp_path / "corpus" / "rows.jsonl", '{"text": ["a", "list"]}')
    with pytest.raises(ConfigError, match=r"mixed-type \(JSON\) values, not text \(first: .*rows\.jsonl line 4: list"):
        build_token_cache(_config(tmp_path, pattern, tokenizer), tokenizer[1])


def test_the_stream_skips_rows_without_text_and_refuses_other_types(tmp_path: Path, tokenizer) -> None:
    skipping = _jsonl(tmp_path / "skipping" / "rows.jsonl", '{"text": null}')
    config = _config(tmp_path, skipping, tokenizer, streaming=True, shuffle_buffer=0, seq_len=8)
    stream = StreamingPackedBlocks(config, tokenizer[1])
    blocks = [block for _, block in zip(range(200), stream, strict=False)]
    stream_tokens = np.concatenate([blocks[0][:1].numpy()] + [block[1:].numpy() for block in blocks])
    eos = tokenizer[1].token_to_id("<|endoftext|>")
    assert not np.any((stream_tokens[1:] == eos) & (stream_tokens[:-1] == eos)), "a null row became a document"
    typed = _jsonl(tmp_path / "typed" / "rows.jsonl", '{"text": 3}')
    config = _config(tmp_path, typed, tokenizer, streaming=True, shuffle_buffer=0)
    with pytest.raises(ConfigError, match=r"text_field='text' holds a int value, not text"):
        next(iter(StreamingPackedBlocks(config, tokenizer[1])))


def test_an_empty_validation_split_is_refused_like_a_short_one(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("\n".join(DOCUMENTS))
    config = _config(tmp_path, str(tmp_path / "corpus" / "*.txt"), tokenizer, val_fraction=0.1)
    data = PretrainDataModule(config, batch_size=2)
    expected = r"the validation split is empty: .*1 document\(s\).*data\.corpus\.val_fraction=0 to train without"
    with pytest.raises(ConfigError, match=expected):
        data.build_token_data()
    data.trainer = fake_trainer(0, 1)
    with pytest.raises(ConfigError, match=expected):
        data.setup("fit")


def test_val_fraction_zero_trains_without_validation(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("\n".join(DOCUMENTS))
    data = PretrainDataModule(_config(tmp_path, str(tmp_path / "corpus" / "*.txt"), tokenizer, val_fraction=0.0))
    data.trainer = fake_trainer(0, 1)
    data.build_token_data()
    data.setup("fit")
    assert data.val_dataloader() == []
    assert len(data.train_dataloader()) > 0
