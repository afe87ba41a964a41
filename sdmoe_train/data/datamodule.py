"""Lightning data module for pretraining: token cache or streaming, resumable at the exact next batch.

The data module owns the data position (epoch of the permutation and examples consumed), and three
Lightning 2.6 behaviours shape how it is kept:

* Lightning calls the data module's ``on_before_batch_transfer`` in the main process for every
  batch the training loop takes (``_TrainingEpochLoop.advance``), after prefetching and just before
  ``training_step``. The module counts those batches, while ``trainer.training`` is set, and advances
  the sampler (or the stream) by them. If the LightningModule overrides the same hook, Lightning
  still calls only the data module's (and warns).
* Lightning saves ``state_dict()`` in every checkpoint under the class name and calls
  ``load_state_dict`` on restore, after ``setup`` and before the train dataloader is requested.
* Lightning's epoch counter is not the data position: a run stopped by ``max_steps`` in the middle
  of an epoch is saved as a finished epoch, and its continuation starts a new one. The sampler
  therefore ignores Lightning's ``set_epoch`` calls and moves to the next permutation itself when
  no full batch is left. A Lightning epoch is then just one pass of the train dataloader, which
  may be shorter than a data epoch after a resume or with ``limit_train_batches``.

Checkpoints therefore record exactly the batches whose training step started, and a resumed run
continues with the next one, whether it was killed mid-epoch or stopped at ``max_steps`` and
continued with a larger one. Validation batches are never counted.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from sdmoe_train.data.cache import build_token_cache, load_token_cache
from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.sampler import ResumableDistributedSampler
from sdmoe_train.data.streaming import StreamingPackedBlocks, held_out_documents
from sdmoe_train.data.tokenizer import eos_token_id, load_tokenizer
from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel.gather import all_gather_objects

log = logging.getLogger(__name__)

_MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class _DataModuleSampler(ResumableDistributedSampler):
    """The train sampler of :class:`PretrainDataModule`: only the data module moves it to a new epoch."""

    def set_epoch(self, epoch: int) -> None:
        """Ignores Lightning's epoch counter, which is not the data position (see the module docstring)."""

    def start_next_epoch(self) -> None:
        """Moves to the next epoch's permutation, starting from its beginning."""
        super().set_epoch(self.epoch + 1)


class PretrainDataModule(L.LightningDataModule):
    """Batches of packed token blocks, int64 of shape (batch_size, seq_len + 1)."""

    def __init__(self, corpus: DataConfig, batch_size: int = 8, num_workers: int = 0) -> None:
        """Stores the settings; nothing is read until ``prepare_data``/``setup``.

        Args:
            corpus: Where the text comes from and how it is tokenized and packed.
            batch_size: Per-device micro-batch size.
            num_workers: DataLoader worker processes (token cache mode; streaming needs 0).

        Raises:
            ConfigError: If batch_size or num_workers is invalid.
        """
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ConfigError(f"num_workers={num_workers} must be >= 0")
        if corpus.streaming and num_workers > 0:
            raise ConfigError(
                f"num_workers={num_workers} with data.corpus.streaming=true: the resume position of the stream is "
                "tracked in the training process, so use num_workers=0 (tokenization is multi-threaded anyway)"
            )
        self.corpus = corpus
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._tokenizer: Tokenizer | None = None
        self._train_blocks: PackedBlocks | None = None
        self._val_blocks: PackedBlocks | None = None
        self._stream: StreamingPackedBlocks | None = None
        self._sampler: _DataModuleSampler | None = None
        self._restored_state: dict[str, Any] | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer named by ``data.corpus.tokenizer``, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.corpus.tokenizer)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer, special tokens included."""
        return self.tokenizer.get_vocab_size()

    @property
    def tokenizer_identity(self) -> dict[str, Any]:
        """Vocabulary size and SHA-256 of the serialized tokenizer; checkpoints record it (see run_identity)."""
        serialized = self.tokenizer.to_str().encode()
        return {"vocab_size": self.vocab_size, "sha256": hashlib.sha256(serialized).hexdigest()}

    @property
    def eos_token_id(self) -> int:
        """Id of the end-of-document token that separates documents in every batch."""
        return eos_token_id(self.tokenizer)

    def prepare_data(self) -> None:
        """Builds (or reuses) the token cache; Lightning runs this on one process per node.

        Raises:
            ConfigError: If the tokenizer or the data files are missing.
        """
        tokenizer = self.tokenizer
        if self.corpus.streaming:
            self.corpus.resolve_files()
        else:
            build_token_cache(self.corpus, tokenizer)

    def setup(self, stage: str) -> None:
        """Opens the token cache (or the document stream) on every process."""
        if self._train_blocks is not None or self._stream is not None:
            return
        seq_len = self.corpus.seq_len
        if self.corpus.streaming:
            val_tokens: np.ndarray = np.empty(0, np.int64)
            held_out: frozenset[bytes] = frozenset()
            if self.corpus.streaming_val_docs > 0:
                val_tokens, held_out = held_out_documents(self.corpus, self.tokenizer)
            rank, world_size = self._rank_and_world_size()
            self._stream = StreamingPackedBlocks(
                self.corpus, self.tokenizer, rank=rank, world_size=world_size, held_out=held_out
            )
            if self._restored_state is not None:
                self._restore_stream(self._restored_state)
        else:
            cache = load_token_cache(self.corpus, self.tokenizer)
            self._train_blocks = PackedBlocks(cache.train_tokens, seq_len, "train")
            val_tokens = cache.val_tokens
        if len(val_tokens) > 0:
            self._val_blocks = PackedBlocks(val_tokens, seq_len, "validation")

    def train_dataloader(self) -> DataLoader:
        """Shuffled, rank-sharded, resumable batches (endless in streaming mode)."""
        if self._stream is not None:
            return DataLoader(self._stream, batch_size=self.batch_size, pin_memory=self._pin_memory())
        assert self._train_blocks is not None, "setup() must run before train_dataloader()"
        if self._sampler is None:
            rank, world_size = self._rank_and_world_size()
            self._sampler = _DataModuleSampler(
                self._train_blocks, num_replicas=world_size, rank=rank, seed=self.corpus.shuffle_seed
            )
            if self._sampler.num_samples < self.batch_size:
                raise ConfigError(
                    f"the train split has {len(self._train_blocks)} examples of "
                    f"data.corpus.seq_len={self.corpus.seq_len} "
                    f"+ 1 tokens, {self._sampler.num_samples} per rank on {world_size} ranks, fewer than "
                    f"batch_size={self.batch_size}; lower batch_size or data.corpus.seq_len, or add documents"
                )
            if self._restored_state is not None:
                self._restore_sampler(self._restored_state)
            # Lightning warns that a mid-epoch resume is unreliable unless the DataLoader itself is
            # stateful; this data module restores the position, so the warning does not apply here.
            warnings.filterwarnings("ignore", message=_MID_EPOCH_RESUME_WARNING, category=PossibleUserWarning)
        return DataLoader(
            self._train_blocks,
            batch_size=self.batch_size,
            sampler=self._sampler,
            drop_last=True,
            num_workers=self.num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation blocks in order, sharded across ranks; empty when nothing is held out.

        Each rank gets ``len // world_size`` blocks, so up to world_size - 1 trailing blocks are not
        evaluated (padding by repetition, as DistributedSampler does, would bias the loss instead).
        """
        if self._val_blocks is None:
            return []
        rank, world_size = self._rank_and_world_size()
        sampler = ResumableDistributedSampler(self._val_blocks, num_replicas=world_size, rank=rank, shuffle=False)
        # The stream's held-out set is small and in memory, so its loader needs no workers either.
        num_workers = 0 if self.corpus.streaming else self.num_workers
        return DataLoader(
            self._val_blocks,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=num_workers > 0,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts a training batch as consumed; Lightning calls this just before ``training_step``."""
        trainer = self.trainer
        # ModelSummary and TensorBoard graph logging also pass the module's example_input_array
        # through this hook while trainer.training is set; that is not a consumed batch.
        if trainer is None or not trainer.training or batch is trainer.lightning_module.example_input_array:
            return batch
        if self._stream is not None:
            self._stream.advance(len(batch))
        elif self._sampler is not None:
            self._sampler.advance(len(batch))
            self._start_next_epoch_if_exhausted()
        return batch

    def _start_next_epoch_if_exhausted(self) -> None:
        # Moving on as soon as no full batch is left (rather than when the iterator ends) makes a
        # checkpoint taken after an epoch's last batch resume in the next epoch.
        assert self._sampler is not None
        if self._sampler.remaining < self.batch_size:
            self._sampler.start_next_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Returns the training position, stored by Lightning in every checkpoint.

        Token cache mode: ``{"epoch", "consumed", "num_replicas"}`` (identical on every rank); empty
        before the train dataloader exists.
        Streaming mode: ``{"streams": [state of rank 0, rank 1, ...]}``, gathered from all ranks, since
        Lightning writes only rank 0's copy; every rank calls this while saving a checkpoint.
        """
        if self._stream is not None:
            return {"streams": self._gather_across_ranks(self._stream.state_dict())}
        if self._sampler is not None:
            return {**self._sampler.state_dict(), "num_replicas": self._sampler.num_replicas}
        # Nothing consumed yet (Lightning then stores no entry), or a restored position not yet applied.
        return self._restored_state or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`; applied as soon as the sampler or stream exists.

        Raises:
            ConfigError: If the checkpoint comes from the other mode (streaming vs token cache), or a
                streaming checkpoint from a different number of ranks.
        """
        if ("streams" in state_dict) != self.corpus.streaming:
            raise ConfigError(
                f"the checkpoint's data position was saved with data.corpus.streaming={'streams' in state_dict} "
                f"but data.corpus.streaming={self.corpus.streaming}; resume with the setting the run started with"
            )
        self._restored_state = state_dict
        if self._stream is not None:
            self._restore_stream(state_dict)
        if self._sampler is not None:
            self._restore_sampler(state_dict)

    def _restore_sampler(self, state: dict[str, Any]) -> None:
        assert self._sampler is not None
        consumed, saved_replicas = state["consumed"], state["num_replicas"]
        num_replicas = self._sampler.num_replicas
        if saved_replicas != num_replicas:
            # After k indices per rank on R ranks the first k * R positions of the epoch's permutation
            # are used (see ResumableDistributedSampler), whatever the number of ranks that follows.
            used = consumed * saved_replicas
            consumed = used // num_replicas
            log.warning(
                "resuming on %d ranks from a checkpoint taken on %d: %d examples of epoch %d were used; "
                "%d of them are seen again",
                num_replicas,
                saved_replicas,
                used,
                state["epoch"],
                used - consumed * num_replicas,
            )
        self._sampler.load_state_dict({"epoch": state["epoch"], "consumed": consumed})
        self._start_next_epoch_if_exhausted()

    def _restore_stream(self, state: dict[str, Any]) -> None:
        assert self._stream is not None
        streams = state["streams"]
        rank, world_size = self._rank_and_world_size()
        if len(streams) != world_size:
            raise ConfigError(
                f"the checkpoint holds stream positions of {len(streams)} ranks but this run has {world_size}; "
                "a streaming run can only resume on the same number of ranks"
            )
        self._stream.load_state_dict(streams[rank])

    def _gather_across_ranks(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        if self.trainer is None:
            return [state]
        return all_gather_objects(self.trainer, state)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _pin_memory(self) -> bool:
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
