"""Token cache: EOS placement, document split, reuse, invalidation, atomic builds and input formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from sdmoe_train.data import cache
from sdmoe_train.data.cache import build_token_cache, load_token_cache, split_documents, token_cache_path
from sdmoe_train.errors import ConfigError
from tests.corpora import make_config, make_tokenizer, write_documents


def _decode_documents(tokenizer: Tokenizer, tokens: np.ndarray, eos_id: int) -> list[str]:
    assert len(tokens) == 0 or tokens[-1] == eos_id, "the stream must end with EOS"
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[start:end].tolist()) for start, end in zip(starts, ends, strict=True)]


def test_every_document_is_followed_by_eos_and_splits_partition_documents(tmp_path: Path, corpus) -> None:
    documents, pattern, tokenizer_path, tokenizer = corpus
    built = build_token_cache(make_config(tmp_path, pattern, tokenizer_path), tokenizer)
    train = _decode_documents(tokenizer, np.asarray(built.train_tokens), built.eos_token_id)
    val = _decode_documents(tokenizer, np.asarray(built.val_tokens), built.eos_token_id)
    assert len(val) == 3 and len(train) == 9
    assert set(train).isdisjoint(val)
    # Each split keeps corpus order, so the split is a partition of the original documents.
    assert sorted(train + val) == documents
    assert train == [doc for doc in documents if doc in train]
    splits = built.manifest["splits"]
    assert splits["train"]["num_docs"] == 9 and splits["validation"]["num_tokens"] == len(built.val_tokens)
    assert built.train_tokens.dtype == np.uint16 and not built.train_tokens.flags.writeable


@pytest.mark.parametrize(
    ("num_docs", "fraction", "expected_val"),
    [(100, 0.02, 2), (10, 0.01, 1), (2, 0.5, 1), (2, 0.9, 1), (1, 0.5, 0), (10, 0.0, 0), (7, 0.5, 4)],
)
def test_document_split_sizes(num_docs: int, fraction: float, expected_val: int) -> None:
    train, val = split_documents(num_docs, fraction, seed=3)
    assert len(val) == expected_val
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(num_docs))


def test_document_split_is_deterministic_per_seed() -> None:
    first, second, other = (split_documents(50, 0.2, seed)[1] for seed in (7, 7, 8))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_second_build_reuses_the_cache_without_tokenizing(
    tmp_path: Path, corpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    config = make_config(tmp_path, pattern, tokenizer_path)
    first = build_token_cache(config, tokenizer)
    mtime = (first.path / "train.bin").stat().st_mtime_ns

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("documents were loaded again")

    monkeypatch.setattr(cache, "load_documents", no_loading)
    second = build_token_cache(config, tokenizer)
    assert second.path == first.path
    assert (second.path / "train.bin").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.train_tokens, first.train_tokens)
    assert load_token_cache(config, tokenizer).path == first.path


def test_changed_inputs_get_a_new_cache(tmp_path: Path, corpus) -> None:
    documents, pattern, tokenizer_path, tokenizer = corpus
    config = make_config(tmp_path, pattern, tokenizer_path)
    first = build_token_cache(config, tokenizer)
    assert token_cache_path(make_config(tmp_path, pattern, tokenizer_path, val_fraction=0.5), tokenizer) != first.path
    _, other_tokenizer = make_tokenizer(tmp_path / "other", documents, vocab_size=280)
    assert token_cache_path(config, other_tokenizer) != first.path

    changed = Path(pattern).parent / "doc_000.txt"
    changed.write_text("doc000: a changed first document")
    os.utime(changed, ns=(1, 1))
    second = build_token_cache(config, tokenizer)
    assert second.path != first.path
    assert "a changed first document" in tokenizer.decode(np.concatenate([second.train_tokens, second.val_tokens]))


def test_interrupted_build_leaves_nothing_reusable(tmp_path: Path, corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    config = make_config(tmp_path, pattern, tokenizer_path)
    real_write = cache._write_tokens

    def write_then_crash(documents, path, dtype):
        if path.name == "validation.bin":
            raise KeyboardInterrupt("killed mid-build")
        return real_write(documents, path, dtype)

    monkeypatch.setattr(cache, "_write_tokens", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        build_token_cache(config, tokenizer)
    assert list(Path(config.cache_dir).iterdir()) == []
    with pytest.raises(ConfigError, match="no token cache at"):
        load_token_cache(config, tokenizer)

    monkeypatch.setattr(cache, "_write_tokens", real_write)
    assert build_token_cache(config, tokenizer).manifest["splits"]["train"]["num_docs"] == 9


def test_leftover_staging_directory_of_a_killed_build_is_ignored(tmp_path: Path, corpus) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    config = make_config(tmp_path, pattern, tokenizer_path)
    final = token_cache_path(config, tokenizer)
    leftover = final.parent / f".{final.name}.killed.partial"
    leftover.mkdir(parents=True)
    (leftover / "manifest.json").write_text("{}")
    assert build_token_cache(config, tokenizer).path == final
    assert leftover.exists()


def test_truncated_split_file_is_reported(tmp_path: Path, corpus) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    built = build_token_cache(make_config(tmp_path, pattern, tokenizer_path), tokenizer)
    os.truncate(built.path / "train.bin", 10)
    with pytest.raises(ConfigError, match="token cache .* is corrupt: train.bin has 10 bytes"):
        cache.TokenCache.open(built.path)


def test_txt_jsonl_and_parquet_give_identical_token_streams(tmp_path: Path, corpus) -> None:
    documents, txt_pattern, tokenizer_path, tokenizer = corpus
    streams = {}
    for fmt in ("txt", "jsonl", "parquet"):
        pattern = txt_pattern if fmt == "txt" else write_documents(tmp_path / fmt, documents, fmt)
        built = build_token_cache(make_config(tmp_path, pattern, tokenizer_path), tokenizer)
        streams[fmt] = (np.asarray(built.train_tokens), np.asarray(built.val_tokens))
    for fmt in ("jsonl", "parquet"):
        np.testing.assert_array_equal(streams[fmt][0], streams["txt"][0])
        np.testing.assert_array_equal(streams[fmt][1], streams["txt"][1])


def test_named_dataset_goes_through_the_same_cache(tmp_path: Path, corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    # A local directory laid out like a hub dataset repository stands in for a hub name offline.
    documents, _, tokenizer_path, tokenizer = corpus
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_home")
    repository = tmp_path / "hub_repo"
    (repository / "data").mkdir(parents=True)
    lines = [json.dumps({"body": text, "id": index}) for index, text in enumerate(documents)]
    (repository / "data" / "train-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    named = make_config(tmp_path, "unused.jsonl", tokenizer_path, data_files=[], dataset_name=str(repository))
    from_hub = build_token_cache(named, tokenizer)
    from_files = build_token_cache(make_config(tmp_path, corpus[1], tokenizer_path), tokenizer)
    assert from_hub.manifest["sources"] == [{"dataset_name": str(repository), "config": None, "split": "train"}]
    np.testing.assert_array_equal(from_hub.train_tokens, from_files.train_tokens)
    np.testing.assert_array_equal(from_hub.val_tokens, from_files.val_tokens)


def test_two_tokenizing_processes_give_the_same_cache(tmp_path: Path, corpus) -> None:
    # Dataset.map(num_proc=2) pickles the tokenizer into worker processes.
    _, pattern, tokenizer_path, tokenizer = corpus
    single = build_token_cache(make_config(tmp_path / "a", pattern, tokenizer_path, num_proc=1), tokenizer)
    double = build_token_cache(make_config(tmp_path / "b", pattern, tokenizer_path, num_proc=2), tokenizer)
    np.testing.assert_array_equal(double.train_tokens, single.train_tokens)
    np.testing.assert_array_equal(double.val_tokens, single.val_tokens)


def test_vocabularies_beyond_uint16_are_stored_as_uint32(tmp_path: Path) -> None:
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {f"w{index}": index + 2 for index in range(70_000)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer_path = tmp_path / "big.json"
    tokenizer.save(str(tokenizer_path))
    pattern = write_documents(tmp_path / "corpus", ["w69999 w3 w65536", "w1 w2"])
    built = build_token_cache(make_config(tmp_path, pattern, tokenizer_path, val_fraction=0.0), tokenizer)
    assert built.manifest["dtype"] == "uint32"
    assert built.train_tokens.tolist() == [70_001, 5, 65_538, 0, 3, 4, 0]


def test_missing_text_column_lists_the_columns(tmp_path: Path, corpus) -> None:
    documents, _, tokenizer_path, tokenizer = corpus
    pattern = write_documents(tmp_path / "jsonl", documents, "jsonl")
    config = make_config(tmp_path, pattern, tokenizer_path, text_field="content")
    with pytest.raises(ConfigError, match=r"data\.corpus\.text_field='content' is not a column.*'body'"):
        build_token_cache(config, tokenizer)


@pytest.mark.parametrize("damage", ["unreadable_manifest", "missing_split_file"])
def test_damaged_cache_is_reported_with_the_fix(tmp_path: Path, corpus, damage: str) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    built = build_token_cache(make_config(tmp_path, pattern, tokenizer_path), tokenizer)
    if damage == "unreadable_manifest":
        (built.path / "manifest.json").write_text("{not json")
    else:
        (built.path / "validation.bin").unlink()
    with pytest.raises(ConfigError, match=r"token cache .* is damaged .*delete the directory to rebuild it"):
        cache.TokenCache.open(built.path)


def test_a_cache_dir_that_cannot_be_created_is_named_before_tokenizing(tmp_path: Path, corpus) -> None:
    _, pattern, tokenizer_path, tokenizer = corpus
    (tmp_path / "occupied").write_text("a file where the cache directory should be")
    config = make_config(tmp_path, pattern, tokenizer_path, cache_dir=str(tmp_path / "occupied" / "cache"))
    with pytest.raises(ConfigError, match=r"data\.corpus\.cache_dir='.*occupied/cache' cannot be written"):
        build_token_cache(config, tokenizer)
