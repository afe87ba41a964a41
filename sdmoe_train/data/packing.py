"""Packs a flat token stream into fixed-length training examples.

Example ``i`` is ``tokens[i * seq_len : i * seq_len + seq_len + 1]``: inputs are its first seq_len
tokens and targets its last seq_len. Consecutive examples share exactly one token, so every token
except the very first is a target exactly once. Documents are not aligned to examples; they are
separated by the EOS token inside the stream, and the trailing partial example is dropped.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sdmoe_train.errors import ConfigError


def num_blocks(num_tokens: int, seq_len: int) -> int:
    """Number of complete examples of seq_len + 1 tokens in a stream of ``num_tokens``."""
    return max(num_tokens - 1, 0) // seq_len


class PackedBlocks(Dataset[torch.Tensor]):
    """Map-style dataset of overlapping seq_len + 1 token windows over a token array or memmap."""

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train", source: str | None = None) -> None:
        """Wraps a token stream.

        Args:
            tokens: Flat token ids (uint16/uint32 memmap or any integer array).
            seq_len: Tokens per example, not counting the extra target token.
            split: Name of the split, used in error messages.
            source: Name of the mixture source the tokens belong to, used in error messages.

        Raises:
            ConfigError: If the stream holds fewer than seq_len + 1 tokens.
        """
        if len(tokens) < seq_len + 1:
            if split == "validation":
                remedy = (
                    "hold out more documents (data.corpus.val_fraction, or data.corpus.streaming_val_docs), or set "
                    "data.corpus.val_fraction=0 (streaming: streaming_val_docs=0) to train without validation"
                )
            else:
                remedy = "lower data.corpus.val_fraction"
            owner = f"the {split} split" if source is None else f"the {split} split of source {source!r}"
            raise ConfigError(
                f"{owner} has {len(tokens)} tokens but data.corpus.seq_len={seq_len} needs at least "
                f"{seq_len + 1} for one example; use a smaller data.corpus.seq_len, add documents or {remedy}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.split = split

    def __len__(self) -> int:
        return num_blocks(len(self.tokens), self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Returns example ``index`` as an int64 tensor of shape (seq_len + 1,)."""
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range for {len(self)} {self.split} examples")
        start = index * self.seq_len
        # astype copies out of the read-only memmap, so torch gets a writable int64 buffer.
        return torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started with spawn/forkserver receive the dataset by pickle; a memmap
        # would be pickled as a full in-memory copy of the split, so send its file name instead.
        # Only a top-level mapping (base is the mmap) has a trustworthy offset; slices keep their parent's.
        state = self.__dict__.copy()
        if isinstance(self.tokens, np.memmap) and isinstance(self.tokens.base, mmap.mmap):
            state["tokens"] = (self.tokens.filename, self.tokens.dtype.str, self.tokens.offset, len(self.tokens))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], tuple):
            filename, dtype, offset, length = state["tokens"]
            state["tokens"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=(length,))
        self.__dict__.update(state)
