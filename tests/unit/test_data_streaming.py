"""Streaming mode: same blocks as the token cache, held-out validation, rank split and exact resume."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from sdmoe_train.data.cache import build_token_cache
from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.streaming import StreamingPackedBlocks, held_out_documents
from sdmoe_train.errors import ConfigError
from tests.corpora import make_config


def _streaming(tmp_path: Path, corpus, **overrides: object) -> DataConfig:
    _, pattern, tokenizer_path, _ = corpus
    settings = {"streaming": True, "shuffle_buffer": 0, "streaming_val_docs": 0} | overrides
    return make_config(tmp_path, pattern, tokenizer_path, **settings)


def _take(stream: StreamingPackedBlocks, count: int) -> list[torch.Tensor]:
    return list(itertools.islice(iter(stream), count))


def _documents_in(blocks: list[torch.Tensor], tokenizer: Tokenizer) -> list[str]:
    """Complete documents in a run of consecutive blocks (the overlap token removed)."""
    stream = torch.cat([blocks[0][:1]] + [block[1:] for block in blocks]).tolist()
    return tokenizer.decode(stream, skip_special_tokens=False).split("<|endoftext|>")[:-1]


def test_unshuffled_stream_yields_the_token_cache_blocks(tmp_path: Path, corpus) -> None:
    tokenizer = corpus[3]
    cached = build_token_cache(make_config(tmp_path, corpus[1], corpus[2], val_fraction=0.0), tokenizer)
    expected = PackedBlocks(cached.train_tokens, 16)
    blocks = _take(StreamingPackedBlocks(_streaming(tmp_path, corpus), tokenizer), len(expected) + 5)
    assert all(block.shape == (17,) and block.dtype == torch.int64 for block in blocks)
    for index in range(len(expected)):
        torch.testing.assert_close(blocks[index], expected[index])
    # The stream goes on into the next epoch, continuing the packing across the boundary.
    assert blocks[len(expected)][0] == blocks[len(expected) - 1][-1]


def test_named_dataset_streams_like_local_files(tmp_path: Path, corpus) -> None:
    # A local directory laid out like a hub dataset repository stands in for a hub name offline.
    documents, _, tokenizer_path, tokenizer = corpus
    repository = tmp_path / "hub_repo"
    (repository / "data").mkdir(parents=True)
    lines = [json.dumps({"content": text}) for text in documents]
    (repository / "data" / "train-00000-of-00001.jsonl").write_text("\n".join(lines) + "\n")
    named = make_config(
        tmp_path, "unused.jsonl", tokenizer_path, data_files=[], dataset_name=str(repository), text_field="content"
    )
    named = replace(named, streaming=True, shuffle_buffer=0, streaming_val_docs=0)
    from_hub = _take(StreamingPackedBlocks(named, tokenizer), 30)
    from_files = _take(StreamingPackedBlocks(_streaming(tmp_path, corpus), tokenizer), 30)
    assert all(torch.equal(block, expected) for block, expected in zip(from_hub, from_files, strict=True))


@pytest.mark.parametrize("consumed", [0, 3, 40, 130])
def test_restored_stream_continues_with_the_next_block(tmp_path: Path, corpus, consumed: int) -> None:
    config, tokenizer = _streaming(tmp_path, corpus), corpus[3]
    uninterrupted = _take(StreamingPackedBlocks(config, tokenizer), consumed + 20)

    stream = StreamingPackedBlocks(config, tokenizer)
    _take(stream, consumed + 7)  # produced ahead of training, as a prefetching loader does
    stream.advance(consumed)
    state = stream.state_dict()

    resumed = StreamingPackedBlocks(config, tokenizer)
    resumed.load_state_dict(state)
    for expected, block in zip(uninterrupted[consumed:], _take(resumed, 20), strict=True):
        torch.testing.assert_close(block, expected)


def test_advancing_beyond_the_produced_blocks_raises(tmp_path: Path, corpus) -> None:
    stream = StreamingPackedBlocks(_streaming(tmp_path, corpus), corpus[3])
    _take(stream, 2)
    with pytest.raises(ValueError, match="cannot advance by 3 blocks: only 2 were produced"):
        stream.advance(3)


def test_ranks_read_disjoint_documents(tmp_path: Path, corpus) -> None:
    documents, tokenizer = corpus[0], corpus[3]
    config = _streaming(tmp_path, corpus)
    per_rank = []
    for rank in range(2):
        blocks = _take(StreamingPackedBlocks(config, tokenizer, rank=rank, world_size=2), 60)
        per_rank.append(_documents_in(blocks, tokenizer)[: len(documents) // 2])
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == documents


def test_held_out_documents_are_never_trained_on(tmp_path: Path, corpus) -> None:
    documents, tokenizer = corpus[0], corpus[3]
    config = _streaming(tmp_path, corpus, streaming_val_docs=3)
    val_tokens, held_out = held_out_documents(config, tokenizer)
    assert _documents_in([torch.from_numpy(val_tokens)], tokenizer) == documents[:3]
    blocks = _take(StreamingPackedBlocks(config, tokenizer, held_out=held_out), 90)
    trained = _documents_in(blocks, tokenizer)
    assert trained[:9] == documents[3:]
    assert set(trained).isdisjoint(documents[:3])


def test_shuffled_stream_is_seeded_and_reshuffled_each_epoch(tmp_path: Path, corpus) -> None:
    documents, tokenizer = corpus[0], corpus[3]
    config = _streaming(tmp_path, corpus, shuffle_buffer=4)
    first = _documents_in(_take(StreamingPackedBlocks(config, tokenizer), 250), tokenizer)
    again = _documents_in(_take(StreamingPackedBlocks(config, tokenizer), 250), tokenizer)
    assert first == again
    epochs = [first[: len(documents)], first[len(documents) : 2 * len(documents)]]
    assert all(sorted(epoch) == documents for epoch in epochs)
    assert epochs[0] != documents and epochs[0] != epochs[1]


def test_a_stream_without_training_documents_is_a_config_error(tmp_path: Path, corpus) -> None:
    config = _streaming(tmp_path, corpus, streaming_val_docs=12)
    _, held_out = held_out_documents(config, corpus[3])
    with pytest.raises(ConfigError, match=r"got no training documents.*data\.corpus\.streaming_val_docs=12"):
        _take(StreamingPackedBlocks(config, corpus[3], held_out=held_out), 1)


def test_state_is_plain_data(tmp_path: Path, corpus) -> None:
    stream = StreamingPackedBlocks(_streaming(tmp_path, corpus, shuffle_buffer=4), corpus[3])
    _take(stream, 5)
    stream.advance(5)
    state = stream.state_dict()
    assert state["epoch"] == 0 and isinstance(state["stream"], dict)
    assert isinstance(state["carry"], list) and np.asarray(state["carry"]).dtype == np.int64
