"""PackedBlocks: seq_len + 1 windows that overlap by one token and lose no token."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.errors import ConfigError


# 100 and 32 tokens are exact multiples of seq_len: the last full window needs one token more than they hold.
@pytest.mark.parametrize(("num_tokens", "seq_len"), [(103, 10), (101, 10), (100, 10), (17, 16), (32, 16), (1000, 7)])
def test_blocks_reconstruct_the_stream_without_loss_or_duplication(num_tokens: int, seq_len: int) -> None:
    tokens = np.arange(num_tokens, dtype=np.uint16)
    blocks = PackedBlocks(tokens, seq_len)
    assert len(blocks) == (num_tokens - 1) // seq_len
    items = [blocks[index] for index in range(len(blocks))]
    assert all(item.shape == (seq_len + 1,) and item.dtype == torch.int64 for item in items)
    for previous, current in zip(items, items[1:], strict=False):
        assert previous[-1] == current[0]
    stream = torch.cat([items[0][:1]] + [item[1:] for item in items])
    covered = len(blocks) * seq_len + 1
    torch.testing.assert_close(stream, torch.from_numpy(tokens[:covered].astype(np.int64)))
    # Only the trailing partial block is dropped.
    assert num_tokens - covered < seq_len


def test_every_token_but_the_first_is_a_target_exactly_once() -> None:
    tokens = np.random.default_rng(0).integers(0, 500, size=257).astype(np.uint16)
    blocks = PackedBlocks(tokens, 32)
    targets = torch.cat([blocks[index][1:] for index in range(len(blocks))])
    torch.testing.assert_close(targets, torch.from_numpy(tokens[1:257].astype(np.int64)))


def test_index_out_of_range_raises() -> None:
    blocks = PackedBlocks(np.arange(21), 10)
    assert blocks[1].tolist() == list(range(10, 21))
    for index in (2, -1):
        # A negative index must not wrap around: numpy would slice a short or empty example from the end.
        with pytest.raises(IndexError, match=rf"example {index} out of range for 2 \w+ examples"):
            blocks[index]


@pytest.mark.parametrize(
    ("split", "hint"), [("train", "lower data.corpus.val_fraction"), ("validation", "hold out more documents")]
)
def test_too_short_split_names_split_counts_and_fix(split: str, hint: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"the {split} split has 16 tokens but data\.corpus\.seq_len=16 .*17.*{hint}"
    ):
        PackedBlocks(np.arange(16), 16, split)


def test_memmap_is_pickled_by_file_name_not_by_content(tmp_path: Path) -> None:
    np.arange(50_000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    blocks = PackedBlocks(np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="r"), 64)
    payload = pickle.dumps(blocks)
    assert len(payload) < 2_000
    restored = pickle.loads(payload)
    assert isinstance(restored.tokens, np.memmap) and len(restored) == len(blocks)
    torch.testing.assert_close(restored[100], blocks[100])
