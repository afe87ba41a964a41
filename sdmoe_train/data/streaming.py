"""Streaming mode: tokenize and pack documents on the fly, for corpora larger than the token cache.

Each rank reads its part of the document stream (``datasets.distributed.split_dataset_by_node``),
shuffles it through a seeded buffer, tokenizes, appends EOS and packs seq_len + 1 token blocks with
the same one-token overlap as :class:`~sdmoe_train.data.packing.PackedBlocks`. The stream never
ends: after the last document it starts the next epoch (``datasets`` reshuffles with seed + epoch),
so training length is set by ``trainer.max_steps``, and Lightning validates only with an integer
``val_check_interval`` (steps) and ``check_val_every_n_epoch=None``.

Validation holds out the first ``streaming_val_docs`` documents of the unshuffled, unsplit stream.
Every rank reads the same held-out documents into memory, and training skips any document whose
text equals a held-out one (duplicates elsewhere in the corpus included), so the two never overlap.

Resuming restores the epoch, the position in the ``datasets`` stream (its ``state_dict``) and the
tokens already read but not yet packed. One limit comes from ``datasets``: the contents of the
shuffle buffer are not part of its state, so on resume the buffer is refilled from the stream and
the up to ``shuffle_buffer`` documents it held are not seen in that epoch. ``shuffle_buffer=0``
reads documents in file order and resumes exactly.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer
from torch.utils.data import IterableDataset

from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.documents import document_texts, load_documents
from sdmoe_train.data.packing import num_blocks
from sdmoe_train.data.tokenizer import encode_documents, eos_token_id
from sdmoe_train.errors import ConfigError

_ENCODE_BATCH_DOCS = 64
"""Documents tokenized per ``encode_batch`` call (the tokenizer parallelises within a call)."""


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def held_out_documents(config: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, frozenset[bytes]]:
    """Reads the validation documents of streaming mode: the first ``streaming_val_docs`` documents.

    Args:
        config: Data settings.
        tokenizer: The tokenizer.

    Returns:
        Their token stream (each document followed by EOS) and the digests of their texts, which
        :class:`StreamingPackedBlocks` uses to leave them out of training.
    """
    documents = load_documents(config, streaming=True)
    texts = list(itertools.islice(document_texts(documents, config), config.streaming_val_docs))
    ids = encode_documents(tokenizer, texts, eos_token_id(tokenizer))
    tokens = np.fromiter((token for document in ids for token in document), dtype=np.int64)
    return tokens, frozenset(_digest(text) for text in texts)


@dataclass
class _Position:
    """Where the stream resumes: the epoch, the ``datasets`` stream state and unpacked tokens."""

    epoch: int = 0
    stream_state: dict[str, Any] | None = None
    carry: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


class StreamingPackedBlocks(IterableDataset):
    """Endless stream of int64 blocks of shape (seq_len + 1,) for one rank, resumable mid-epoch.

    Like :class:`~sdmoe_train.data.sampler.ResumableDistributedSampler`, the resume position moves
    only when the training loop reports consumed blocks through :meth:`advance`; blocks that were
    produced ahead (prefetched) are produced again after a resume. The stream must be read in the
    process that calls :meth:`advance` (``DataLoader(num_workers=0)``); the tokenizer still uses
    all cores inside ``encode_batch``.
    """

    def __init__(
        self,
        config: DataConfig,
        tokenizer: Tokenizer,
        *,
        rank: int = 0,
        world_size: int = 1,
        held_out: frozenset[bytes] = frozenset(),
    ) -> None:
        """Opens the document stream of one rank.

        Args:
            config: Data settings (seq_len, shuffle_seed, shuffle_buffer, sources).
            tokenizer: The tokenizer.
            rank: This rank in ``[0, world_size)``.
            world_size: Data-parallel ranks sharing the stream.
            held_out: Digests of validation documents to skip (from :func:`held_out_documents`).
        """
        self.config = config
        self.tokenizer = tokenizer
        self.eos_id = eos_token_id(tokenizer)
        self.rank = rank
        self.world_size = world_size
        self.held_out = held_out
        self._documents = load_documents(config, streaming=True)
        self._position = _Position()
        self._pending: deque[_Position] = deque()

    def _epoch_stream(self, epoch: int) -> datasets.IterableDataset:
        stream = split_dataset_by_node(self._documents, rank=self.rank, world_size=self.world_size)
        if self.config.shuffle_buffer > 0:
            stream = stream.shuffle(seed=self.config.shuffle_seed, buffer_size=self.config.shuffle_buffer)
        stream.set_epoch(epoch)
        return stream

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Yields blocks starting at the consumed position; blocks produced earlier but never
        consumed are produced again."""
        self._pending.clear()
        position = self._position
        epoch, stream_state, carry = position.epoch, position.stream_state, position.carry
        seq_len = self.config.seq_len
        while True:
            stream = self._epoch_stream(epoch)
            if stream_state is not None:
                stream.load_state_dict(stream_state)
            documents_read = 0
            for texts, states in self._document_batches(stream):
                documents_read += len(texts)
                for ids, state in zip(encode_documents(self.tokenizer, texts, self.eos_id), states, strict=True):
                    buffer = np.concatenate([carry, np.asarray(ids, dtype=np.int64)])
                    count = num_blocks(len(buffer), seq_len)
                    for block in range(count):
                        # After this block the stream resumes after this document, with the rest of
                        # the buffer (from the block's last token, which the next block repeats).
                        self._pending.append(_Position(epoch, state, buffer[(block + 1) * seq_len :]))
                        yield torch.from_numpy(buffer[block * seq_len : block * seq_len + seq_len + 1].copy())
                    carry = buffer[count * seq_len :]
            if documents_read == 0 and stream_state is None:
                raise ConfigError(
                    f"rank {self.rank} of {self.world_size} got no training documents in epoch {epoch}: the "
                    f"stream is empty or data.corpus.streaming_val_docs={self.config.streaming_val_docs} holds out "
                    "all of it; lower streaming_val_docs or add documents"
                )
            epoch, stream_state = epoch + 1, None

    def _document_batches(self, stream: datasets.IterableDataset) -> Iterator[tuple[list[str], list[dict[str, Any]]]]:
        texts: list[str] = []
        states: list[dict[str, Any]] = []
        for text in document_texts(stream, self.config):
            if self.held_out and _digest(text) in self.held_out:
                continue
            texts.append(text)
            # The state after reading this document: resuming from it continues with the next one.
            states.append(stream.state_dict())
            if len(texts) == _ENCODE_BATCH_DOCS:
                yield texts, states
                texts, states = [], []
        if texts:
            yield texts, states

    def advance(self, num_blocks_consumed: int) -> None:
        """Marks the next ``num_blocks_consumed`` produced blocks as consumed by training.

        Raises:
            ValueError: If fewer blocks than that were produced since the last consumed one.
        """
        if num_blocks_consumed > len(self._pending):
            raise ValueError(f"cannot advance by {num_blocks_consumed} blocks: only {len(self._pending)} were produced")
        for _ in range(num_blocks_consumed):
            self._position = self._pending.popleft()

    def state_dict(self) -> dict[str, Any]:
        """Returns the consumed position: ``{"epoch", "stream" (datasets state or None), "carry"}``."""
        position = self._position
        return {"epoch": position.epoch, "stream": position.stream_state, "carry": position.carry.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`; the next ``__iter__`` continues from it."""
        self._position = _Position(state["epoch"], state["stream"], np.asarray(state["carry"], dtype=np.int64))
        self._pending.clear()
