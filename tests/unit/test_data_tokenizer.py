"""Tokenizer training, loading, EOS lookup and document encoding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from sdmoe_train.data.tokenizer import (
    EOS_TOKEN,
    encode_documents,
    eos_token_id,
    load_tokenizer,
    train_tokenizer,
)
from sdmoe_train.errors import ConfigError
from tests.corpora import make_documents, make_tokenizer, write_documents


def _word_level(vocab: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({token: index for index, token in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_trained_tokenizer_round_trips_text_and_has_eos_zero(tmp_path: Path) -> None:
    documents = make_documents()
    path, tokenizer = make_tokenizer(tmp_path, documents)
    loaded = load_tokenizer(path)
    assert eos_token_id(loaded) == 0 and loaded.id_to_token(0) == EOS_TOKEN
    assert 257 <= loaded.get_vocab_size() <= 300
    text = documents[3] + " unseen wörds ✓"
    assert loaded.decode(loaded.encode(text).ids) == text
    assert loaded.to_str() == tokenizer.to_str()


def test_train_tokenizer_reads_a_json_text_field(tmp_path: Path) -> None:
    pattern = write_documents(tmp_path / "corpus", make_documents(), "jsonl")
    tokenizer = train_tokenizer([pattern], 280, tmp_path / "tok.json", text_field="body")
    merged = [token for token in tokenizer.get_vocab() if len(token) > 1 and token != EOS_TOKEN]
    assert merged, "no merges were learnt"
    # Merges come from the document text, never from the json syntax around it.
    assert not any(char in token for token in merged for char in '{}":')


def test_interrupted_tokenizer_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = make_tokenizer(tmp_path, make_documents())
    before = path.read_text()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        train_tokenizer([str(tmp_path / "tokenizer_corpus" / "*.txt")], 270, path)
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]


def test_load_tokenizer_accepts_a_pretrained_directory(tmp_path: Path) -> None:
    path, tokenizer = make_tokenizer(tmp_path, make_documents())
    assert load_tokenizer(path.parent).to_str() == tokenizer.to_str()


def test_missing_tokenizer_points_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.corpus\.tokenizer='.*nope\.json'.*sdmoe-train prepare"):
        load_tokenizer(tmp_path / "nope.json")


def test_unreadable_tokenizer_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_eos_lookup_falls_back_to_s_and_fails_without_any() -> None:
    assert eos_token_id(_word_level(["<unk>", "a", "</s>", "<eos>"])) == 2
    with pytest.raises(ConfigError, match=r"none of the end-of-document tokens"):
        eos_token_id(_word_level(["<unk>", "a"]))


def test_small_vocab_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"vocab_size=100 must be >= 257"):
        train_tokenizer([str(tmp_path / "*.txt")], 100, tmp_path / "t.json")


def test_encoding_appends_eos_and_drops_the_tokenizers_own_specials() -> None:
    tokenizer = _word_level(["<unk>", "<bos>", "</s>", "to", "be"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    assert tokenizer.encode("to be").ids == [1, 3, 4]
    assert encode_documents(tokenizer, ["to be", None, "be"], eos_id=2) == [[3, 4, 2], [2], [4, 2]]
