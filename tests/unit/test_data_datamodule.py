"""PretrainDataModule position bookkeeping without a Trainer: counting, rank changes, state round trips."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.errors import ConfigError
from tests.corpora import fake_trainer, make_config, make_documents, make_mixture, make_tokenizer, write_documents

BATCH = 4


@pytest.fixture
def config(tmp_path: Path):
    documents = make_documents(count=16)
    pattern = write_documents(tmp_path / "corpus", documents)
    tokenizer_path, _ = make_tokenizer(tmp_path, documents)
    return make_config(tmp_path, pattern, tokenizer_path)


def _data_module(config, rank: int, world_size: int, state: dict | None = None) -> PretrainDataModule:
    data = PretrainDataModule(config, batch_size=BATCH)
    data.trainer = fake_trainer(rank, world_size)
    data.prepare_data()
    data.setup("fit")
    if state is not None:
        data.load_state_dict(state)
    return data


def _consume(data: PretrainDataModule, batches: int) -> list[int]:
    """Takes `batches` batches the way Lightning does; returns the example indices they held."""
    indices = list(data.train_dataloader().sampler)[: batches * BATCH]
    for _ in range(batches):
        data.on_before_batch_transfer(torch.zeros(BATCH, 17, dtype=torch.long), 0)
    return indices


def test_only_training_batches_are_counted(config) -> None:
    data = _data_module(config, 0, 1)
    data.train_dataloader()
    data.on_before_batch_transfer(torch.zeros(BATCH, 17, dtype=torch.long), 0)
    data.trainer = fake_trainer(0, 1, training=False)
    data.on_before_batch_transfer(torch.zeros(BATCH, 17, dtype=torch.long), 0)
    example = torch.zeros(BATCH, 17, dtype=torch.long)
    data.trainer = fake_trainer(0, 1, example=example)
    data.on_before_batch_transfer(example, 0)
    assert data.state_dict() == {"epoch": 0, "consumed": BATCH, "num_replicas": 1}


def test_state_round_trip_before_and_after_the_sampler_exists(config) -> None:
    first = _data_module(config, 0, 1)
    consumed = _consume(first, 3)
    state = first.state_dict()
    second = _data_module(config, 0, 1, state)
    assert second.state_dict() == state
    remaining = list(second.train_dataloader().sampler)
    assert remaining == list(first.train_dataloader().sampler)
    assert set(remaining).isdisjoint(consumed)


@pytest.mark.parametrize(("new_world_size", "repeated"), [(4, 0), (1, 0), (5, 4)])
def test_resuming_on_another_number_of_ranks_continues_the_global_position(
    config, new_world_size: int, repeated: int, caplog: pytest.LogCaptureFixture
) -> None:
    old_ranks = [_data_module(config, rank, 2) for rank in range(2)]
    consumed = [index for data in old_ranks for index in _consume(data, 3)]
    state = old_ranks[0].state_dict()
    assert state == {"epoch": 0, "consumed": 3 * BATCH, "num_replicas": 2}

    with caplog.at_level(logging.WARNING, logger="sdmoe_train.data.sampler"):
        new_ranks = [_data_module(config, rank, new_world_size, state) for rank in range(new_world_size)]
        resumed = [index for data in new_ranks for index in data.train_dataloader().sampler]
    assert len(set(resumed)) == len(resumed)
    assert len(set(resumed) & set(consumed)) == repeated
    if repeated:
        assert f"{repeated} of them are seen again" in caplog.text
    # Nothing of the epoch is skipped beyond the tail that the new ranks' even split drops.
    num_examples = len(old_ranks[0].train_dataloader().dataset)
    assert len(set(resumed) | set(consumed)) == num_examples // new_world_size * new_world_size


def test_streaming_position_must_resume_on_the_same_number_of_ranks(config) -> None:
    data = _data_module(replace(config, streaming=True, streaming_val_docs=0, shuffle_buffer=0), 0, 1)
    with pytest.raises(ConfigError, match="positions of 2 ranks but this run has 1"):
        data.load_state_dict({"streams": [{"epoch": 0, "stream": None, "carry": []}] * 2})


def test_invalid_loader_settings_are_rejected(config) -> None:
    with pytest.raises(ConfigError, match="batch_size=0 must be >= 1"):
        PretrainDataModule(config, batch_size=0)
    with pytest.raises(ConfigError, match="num_workers=-1 must be >= 0"):
        PretrainDataModule(config, num_workers=-1)


def test_data_module_is_built_from_yaml_by_jsonargparse() -> None:
    # LightningCLI builds the data module through jsonargparse from the typed __init__ signature.
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PretrainDataModule, "data")
    settings = parser.parse_string(
        "data:\n  corpus:\n    data_files: [corpus/*.jsonl]\n    seq_len: 64\n  batch_size: 2\n"
    )
    data = parser.instantiate(settings).data
    assert isinstance(data, PretrainDataModule) and data.batch_size == 2
    assert data.corpus.seq_len == 64 and data.corpus.file_format == "json"


# --- mixtures --------------------------------------------------------------------------------------


@pytest.fixture
def mixture(tmp_path: Path):
    return make_mixture(tmp_path)


def _mixture_module(mixture, rank: int = 0, world_size: int = 1, **settings) -> PretrainDataModule:
    shared, sources = mixture
    data = PretrainDataModule(shared, batch_size=BATCH, corpora=sources, **settings)
    data.trainer = fake_trainer(rank, world_size)
    data.prepare_data()
    data.setup("fit")
    return data


def test_mixture_state_counts_global_examples_per_source_and_logs_tokens_and_epochs(mixture) -> None:
    data = _mixture_module(mixture, rank=1, world_size=2)
    data.train_dataloader()
    for _ in range(5):
        data.on_before_batch_transfer(torch.zeros(BATCH, 17, dtype=torch.long), 0)
    sources = data.state_dict()["mixture"]["sources"]
    assert [source["consumed"] for source in sources] == [30, 10]  # 5 steps x 4 x 2 ranks, shares 3:1
    metrics = data.mixture_metrics()
    assert metrics["data/tokens/plays"] == 30 * 16 and metrics["data/tokens/psalms"] == 10 * 16
    assert metrics["data/epoch/psalms"] == pytest.approx(10 / sources[1]["num_examples"])


def test_mixture_validates_each_source_separately(mixture) -> None:
    data = _mixture_module(mixture)
    loaders = data.val_dataloader()
    assert data.validation_sources == ["plays", "psalms"] and len(loaders) == 2
    for loader, (name, other) in zip(loaders, [("plays", "psalms"), ("psalms", "plays")], strict=True):
        text = data.tokenizer.decode(np.asarray(loader.dataset.tokens).tolist())
        assert name in text and other not in text


def test_mixture_checkpoint_refuses_a_single_corpus_and_back(mixture, config) -> None:
    mixed = _mixture_module(mixture)
    mixed.train_dataloader()
    single = _data_module(config, 0, 1)
    with pytest.raises(ConfigError, match="belongs to a mixture .* but this recipe trains on a single data.corpus"):
        single.load_state_dict(mixed.state_dict())
    single.train_dataloader()
    with pytest.raises(ConfigError, match="belongs to a single data.corpus but this recipe trains on a mixture"):
        mixed.load_state_dict(single.state_dict())


def test_mixture_resume_with_changed_weights_is_refused_unless_allowed(mixture, tmp_path: Path) -> None:
    data = _mixture_module(mixture)
    data.train_dataloader()
    data.on_before_batch_transfer(torch.zeros(BATCH, 17, dtype=torch.long), 0)
    state = data.state_dict()
    shared, sources = mixture
    reweighted = (shared, [replace(sources[0], weight=1.0), sources[1]])
    with pytest.raises(ConfigError, match=r"data\.corpora\[plays\]\.weight: checkpoint 3\.0 != recipe 1\.0"):
        _mixture_module(reweighted).load_state_dict(state)
    allowed = _mixture_module(reweighted, allow_mixture_change=True)
    allowed.load_state_dict(state)
    assert allowed.state_dict()["mixture"]["sources"][0]["consumed"] == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"corpora": []}, r"data\.corpora=\[\] lists no source"),
        ({"duplicate": True}, r"data\.corpora names \['plays'\] more than once"),
        ({"corpus_files": True}, r"data\.corpus\.data_files=.* and data\.corpora both name documents"),
        ({"streaming": True}, r"data\.corpus\.streaming=true works with a single data\.corpus only"),
        ({"prepared_dir": " "}, r"data\.prepared_dir=' ' must name a directory"),
        ({"single_allow": True}, r"data\.allow_mixture_change=true needs a mixture"),
    ],
)
def test_invalid_mixture_settings_are_rejected(mixture, change: dict, message: str) -> None:
    shared, sources = mixture
    settings: dict = {"corpora": sources}
    if "corpora" in change:
        settings["corpora"] = change["corpora"]
    if change.get("duplicate"):
        settings["corpora"] = [sources[0], replace(sources[1], name="plays")]
    if change.get("corpus_files"):
        shared = replace(shared, data_files=["corpus/*.txt"])
    if change.get("streaming"):
        shared = replace(shared, streaming=True)
    if "prepared_dir" in change:
        settings["prepared_dir"] = change["prepared_dir"]
    if change.get("single_allow"):
        shared, settings = replace(shared, data_files=["corpus/*.txt"]), {"allow_mixture_change": True}
    with pytest.raises(ConfigError, match=message):
        PretrainDataModule(shared, **settings)


def test_mixture_is_built_from_yaml_by_jsonargparse() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PretrainDataModule, "data")
    settings = parser.parse_string(
        "data:\n  corpus: {seq_len: 32}\n  corpora:\n"
        "    - {name: a, data_files: [a/*.txt], weight: 2}\n    - {name: b, dataset_name: some/hub, text_field: body}\n"
        "  cross_document_attention: false\n"
    )
    data = parser.instantiate(settings).data
    assert list(data.sources) == ["a", "b"] and data.mixture_weights == {"a": 2.0, "b": 1.0}
    assert data.sources["b"].text_field == "body" and not data.cross_document_attention
