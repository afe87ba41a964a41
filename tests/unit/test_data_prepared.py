"""Prepared data: the on-disk format, identical batches to the token cache, runs without the raw text, and
every way a prepared directory can disagree with the recipe."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sdmoe_train.data import cache, prepared
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.errors import ConfigError
from tests.corpora import fake_trainer, make_config, make_documents, make_mixture, make_tokenizer, write_documents

BATCH = 4


def _module(shared, sources, prepared_dir: Path | None = None) -> PretrainDataModule:
    data = PretrainDataModule(
        shared, batch_size=BATCH, corpora=sources, prepared_dir=prepared_dir and str(prepared_dir)
    )
    data.trainer = fake_trainer(0, 1)
    data.prepare_data()
    data.setup("fit")
    return data


def _batches(data: PretrainDataModule, count: int) -> list[torch.Tensor]:
    batches = []
    for batch, _ in zip(data.train_dataloader(), range(count), strict=False):
        data.on_before_batch_transfer(batch, 0)
        batches.append(batch)
    return batches


@pytest.fixture
def mixture(tmp_path: Path):
    return make_mixture(tmp_path)


def test_prepared_directory_holds_documents_with_offsets_and_a_tokenizer_copy(tmp_path: Path, mixture) -> None:
    shared, sources = mixture
    data = _module(shared, sources, tmp_path / "prepared")
    metadata = json.loads((tmp_path / "prepared" / "prepared.json").read_text())
    assert metadata["format"] == "sdmoe-train-prepared" and metadata["format_version"] == 1
    assert metadata["tokenizer"]["vocab_size"] == data.vocab_size and metadata["dtype"] == "uint16"
    assert (tmp_path / "prepared" / "tokenizer.json").read_text() == data.tokenizer.to_str()
    eos = data.eos_token_id
    for source in sources:
        directory = tmp_path / "prepared" / source.name
        texts = []
        for split in ("train", "validation"):
            tokens = np.fromfile(directory / f"{split}.bin", dtype=np.uint16)
            offsets = np.load(directory / f"{split}.docs.npy")
            assert offsets.dtype == np.int64 and offsets[0] == 0 and offsets[-1] == len(tokens)
            assert np.all(tokens[offsets[1:] - 1] == eos), "every document ends with EOS"
            assert np.count_nonzero(tokens == eos) == len(offsets) - 1
            texts += [
                data.tokenizer.decode(tokens[a : b - 1].tolist()) for a, b in zip(offsets, offsets[1:], strict=False)
            ]
        originals = [path.read_text() for path in sorted(Path(source.data_files[0]).parent.glob("*.txt"))]
        assert sorted(texts) == sorted(originals)


def test_prepared_data_gives_the_same_batches_as_the_token_cache(tmp_path: Path, mixture) -> None:
    shared, sources = mixture
    from_cache = _module(shared, sources)
    from_prepared = _module(shared, sources, tmp_path / "prepared")
    for expected, actual in zip(_batches(from_cache, 12), _batches(from_prepared, 12), strict=True):
        assert torch.equal(expected, actual)
    for expected, actual in zip(from_cache.val_dataloader(), from_prepared.val_dataloader(), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))


def test_single_corpus_prepared_data_gives_the_cache_batches(tmp_path: Path) -> None:
    documents = make_documents(count=16)
    tokenizer_path, _ = make_tokenizer(tmp_path, documents)
    config = make_config(tmp_path, write_documents(tmp_path / "corpus", documents), tokenizer_path)
    from_cache = _module(config, None)
    from_prepared = _module(config, None, tmp_path / "prepared")
    assert (tmp_path / "prepared" / "corpus" / "train.bin").is_file()
    for expected, actual in zip(_batches(from_cache, 6), _batches(from_prepared, 6), strict=True):
        assert torch.equal(expected, actual)


def test_runs_read_prepared_data_without_the_raw_text_or_tokenizing(
    tmp_path: Path, mixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared, sources = mixture
    expected = _batches(_module(shared, sources, tmp_path / "prepared"), 5)
    for source in sources:
        shutil.rmtree(Path(source.data_files[0]).parent)

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("documents were read again")

    monkeypatch.setattr(cache, "load_documents", no_tokenizing)
    actual = _batches(_module(shared, sources, tmp_path / "prepared"), 5)
    assert all(torch.equal(a, b) for a, b in zip(expected, actual, strict=True))


def test_preparing_again_reuses_sources_and_adds_new_ones_beside_them(tmp_path: Path) -> None:
    shared, sources = make_mixture(tmp_path, {"plays": 1.0, "psalms": 1.0, "hymns": 1.0})
    directory = tmp_path / "prepared"
    _module(shared, sources[:2], directory).build_token_data()
    kept = (directory / "plays" / "train.bin").stat().st_mtime_ns
    _module(shared, sources, directory).build_token_data()
    assert (directory / "plays" / "train.bin").stat().st_mtime_ns == kept
    assert sorted(json.loads((directory / "prepared.json").read_text())["sources"]) == ["hymns", "plays", "psalms"]


def test_preparing_a_changed_source_into_the_same_directory_is_refused(tmp_path: Path, mixture) -> None:
    shared, sources = mixture
    _module(shared, sources, tmp_path / "prepared")
    changed = Path(sources[0].data_files[0]).parent / "doc_000.txt"
    changed.write_text("plays a changed play")
    os.utime(changed, ns=(1, 1))
    with pytest.raises(ConfigError, match="holds source 'plays' prepared from other inputs .* never overwritten"):
        PretrainDataModule(shared, corpora=sources, prepared_dir=str(tmp_path / "prepared")).build_token_data()


def _damage(directory: Path, how: str, tmp_path: Path) -> None:
    metadata_file = directory / "prepared.json"
    metadata = json.loads(metadata_file.read_text())
    if how == "unreadable_json":
        metadata_file.write_text("{not json")
    elif how == "other_format":
        metadata_file.write_text(json.dumps({**metadata, "format": "something"}))
    elif how == "other_version":
        metadata_file.write_text(json.dumps({**metadata, "format_version": 99}))
    elif how == "truncated_tokens":
        os.truncate(directory / "plays" / "train.bin", 10)
    elif how == "damaged_offsets":
        np.save(directory / "plays" / "train.docs.npy", np.array([0, 5], dtype=np.int64))
    elif how == "missing_offsets":
        (directory / "psalms" / "validation.docs.npy").unlink()
    elif how == "missing_sources":
        metadata_file.write_text(json.dumps({key: value for key, value in metadata.items() if key != "sources"}))
    elif how == "damaged_source_manifest":
        (directory / "plays" / "manifest.json").write_text('{"dtype": "uint16"}')


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("unreadable_json", "prepared.json is not readable JSON"),
        ("other_format", "is not sdmoe-train prepared data"),
        ("other_version", "has format_version 99; this version of sdmoe-train reads version 1"),
        ("truncated_tokens", "train.bin has 10 bytes"),
        ("damaged_offsets", "train.docs.npy does not describe"),
        ("missing_offsets", "validation.docs.npy is missing or damaged"),
        ("missing_sources", r"prepared.json is damaged \(missing or invalid \['sources'\]\)"),
        ("damaged_source_manifest", r"token cache .*plays is damaged \(KeyError"),
    ],
)
def test_damaged_prepared_data_is_reported(tmp_path: Path, mixture, how: str, message: str) -> None:
    shared, sources = mixture
    _module(shared, sources, tmp_path / "prepared")
    _damage(tmp_path / "prepared", how, tmp_path)
    with pytest.raises(ConfigError, match=message):
        _module(shared, sources, tmp_path / "prepared")


def test_prepared_data_must_match_the_recipe(tmp_path: Path, mixture) -> None:
    shared, sources = mixture
    directory = tmp_path / "prepared"
    _module(shared, sources, directory)
    other_tokenizer, _ = make_tokenizer(tmp_path / "other", make_documents(count=5, seed=9), vocab_size=280)
    with pytest.raises(ConfigError, match=r"prepared with another tokenizer .* use its copy, data\.corpus\.tokenizer="):
        _module(replace(shared, tokenizer=str(other_tokenizer)), sources, directory)
    with pytest.raises(ConfigError, match=r"prepared with data\.corpus\.val_fraction=0\.25 but the recipe sets 0\.1"):
        _module(replace(shared, val_fraction=0.1), sources, directory)
    with pytest.raises(ConfigError, match=r"has no source\(s\) \['hymns'\] \(it has \['plays', 'psalms'\]\)"):
        prepared.open_prepared(directory, shared, PretrainDataModule(shared, corpora=sources).tokenizer, ["hymns"])
    # The recipe's tokenizer may be the copy inside the prepared directory.
    _module(replace(shared, tokenizer=str(directory / "tokenizer.json")), sources, directory)


def test_a_foreign_directory_is_not_used_for_prepared_data(tmp_path: Path, mixture) -> None:
    shared, sources = mixture
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"is a non-empty directory without prepared\.json .*\['notes\.txt'\]"):
        _module(shared, sources, tmp_path / "busy")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        _module(shared, sources, tmp_path / "file")


@pytest.mark.parametrize("killed_in", ["plays", "psalms"])
def test_a_killed_prepare_leaves_only_complete_sources_and_can_be_run_again(
    tmp_path: Path, mixture, monkeypatch: pytest.MonkeyPatch, killed_in: str
) -> None:
    shared, sources = mixture
    real_write = cache._write_tokens

    def crash_in_one_source(documents, path, dtype):
        if path.parent.name.startswith(f".{killed_in}."):
            raise KeyboardInterrupt("killed mid-prepare")
        return real_write(documents, path, dtype)

    monkeypatch.setattr(cache, "_write_tokens", crash_in_one_source)
    with pytest.raises(KeyboardInterrupt):
        _module(shared, sources, tmp_path / "prepared")
    complete = ["plays"] if killed_in == "psalms" else []
    assert list(prepared.read_metadata(tmp_path / "prepared")["sources"]) == complete
    visible = sorted(path.name for path in (tmp_path / "prepared").iterdir() if not path.name.startswith("."))
    assert visible == sorted([*complete, "prepared.json", "tokenizer.json"])
    monkeypatch.setattr(cache, "_write_tokens", real_write)
    assert len(_batches(_module(shared, sources, tmp_path / "prepared"), 3)) == 3
