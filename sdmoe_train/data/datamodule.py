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

A mixture (``data.corpora``) draws from per-source token caches (or a prepared directory) by the
deterministic blend of :mod:`sdmoe_train.data.mixture`; its position is the per-source counts, the
same on every rank, and validation runs one loader per source.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from sdmoe_train import signals
from sdmoe_train.data.cache import TokenCache
from sdmoe_train.data.config import SINGLE_CORPUS_NAME, CorpusSource, DataConfig
from sdmoe_train.data.mixture import (
    MixtureBlocks,
    MixtureSampler,
    MixtureSchedule,
    MixtureSource,
    log_new_epochs,
)
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.data.sampler import ResumableDistributedSampler, TrainingSampler
from sdmoe_train.data.streaming import StreamingPackedBlocks, held_out_documents
from sdmoe_train.data.token_data import (
    build_token_data,
    ensure_token_data,
    open_token_data,
    recipe_sources,
    validation_blocks,
)
from sdmoe_train.data.tokenizer import eos_token_id, load_tokenizer, tokenizer_identity
from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel.gather import all_gather_objects

log = logging.getLogger(__name__)

_MID_EPOCH_RESUME_WARNING = "You're resuming from a checkpoint that ended before the epoch ended"


class PretrainDataModule(L.LightningDataModule):
    """Batches of packed token blocks, int64 of shape (batch_size, seq_len + 1)."""

    def __init__(
        self,
        corpus: DataConfig,
        batch_size: int = 8,
        num_workers: int = 0,
        corpora: list[CorpusSource] | None = None,
        prepared_dir: str | None = None,
        cross_document_attention: bool = True,
        restart_positions: bool = False,
        allow_mixture_change: bool = False,
    ) -> None:
        """Stores the settings; nothing is read until ``prepare_data``/``setup``.

        Args:
            corpus: Tokenizer, packing and cache settings, and the documents of a single-corpus recipe.
            batch_size: Per-device micro-batch size.
            num_workers: DataLoader worker processes (token cache mode; streaming needs 0).
            corpora: The sources of a mixture, each with its documents and weight; ``corpus`` then
                holds only the shared settings (see docs/data.md).
            prepared_dir: Directory of data prepared once by ``sdmoe-train prepare`` (token arrays with
                document offsets); runs read it without the raw text and without tokenizing.
            cross_document_attention: Let tokens attend to earlier documents packed into the same
                sequence (true), or only to their own document (false, block-diagonal causal mask).
            restart_positions: Restart the rotary positions at 0 at every document start.
            allow_mixture_change: Resume a mixture whose sources, weights or sizes differ from the
                checkpoint's (kept sources continue at their positions, new weights apply from then on).

        Raises:
            ConfigError: If a setting or a combination of them is invalid.
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
        self.sources = recipe_sources(corpus, corpora)
        self.is_mixture = corpora is not None
        if prepared_dir is not None and not prepared_dir.strip():
            raise ConfigError(
                f"data.prepared_dir={prepared_dir!r} must name a directory (or be null to use data.corpus.cache_dir)"
            )
        if corpus.streaming and (self.is_mixture or prepared_dir is not None):
            raise ConfigError(
                "data.corpus.streaming=true works with a single data.corpus only: mixtures (data.corpora) and "
                "data.prepared_dir read tokenized data; drop streaming and run `sdmoe-train prepare` once"
            )
        if allow_mixture_change and not self.is_mixture:
            raise ConfigError("data.allow_mixture_change=true needs a mixture (data.corpora)")
        self.corpus = corpus
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prepared_dir = prepared_dir
        self.cross_document_attention = cross_document_attention
        self.restart_positions = restart_positions
        self.allow_mixture_change = allow_mixture_change
        self.mixture_weights = {c.name: c.weight for c in corpora} if corpora is not None else None
        """Source name -> recipe weight of a mixture; None for a single corpus."""
        self._tokenizer: Tokenizer | None = None
        self._train_blocks: PackedBlocks | MixtureBlocks | None = None
        self._val_blocks: PackedBlocks | None = None
        self._val_blocks_by_source: dict[str, PackedBlocks] = {}
        self._stream: StreamingPackedBlocks | None = None
        self._sampler: TrainingSampler | MixtureSampler | None = None
        self._schedule: MixtureSchedule | None = None
        self._restored_state: dict[str, Any] | None = None
        self._interrupted: signals.StopRequested | None = None

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
        return tokenizer_identity(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        """Id of the end-of-document token that separates documents in every batch."""
        return eos_token_id(self.tokenizer)

    def prepare_data(self) -> None:
        """Builds (or reuses) the token caches or prepared data; Lightning runs this on one process per node.

        A ``prepared_dir`` that holds every source is only checked, so runs need neither the raw text
        nor the time to tokenize it; missing sources are prepared beside the others.

        A held preemption signal (:mod:`sdmoe_train.signals`) interrupts the tokenizing at once; nothing
        half-built is kept, and :meth:`setup` then stops every rank together (the others wait for this
        process in Lightning's barrier, so it returns to them instead of raising alone).

        Raises:
            ConfigError: If the tokenizer or the data files are missing, or prepared data does not fit.
        """
        try:
            with signals.interruptible(signals.DATA_PREPARATION):
                tokenizer = self.tokenizer
                if self.corpus.streaming:
                    self.corpus.resolve_files()
                else:
                    ensure_token_data(self.corpus, self.sources, tokenizer, self.prepared_dir)
        except signals.StopRequested as stop:
            self._interrupted = stop

    def build_token_data(self) -> dict[str, TokenCache]:
        """Tokenizes every source that is not yet cached or prepared (what ``sdmoe-train prepare`` runs).

        Returns:
            Source name -> its opened token data.

        Raises:
            ConfigError: As :meth:`prepare_data`, and if a source's validation split cannot give one example
                (checked here so that ``prepare`` fails, not the run that follows it).
            StopRequested: A held preemption signal interrupted the tokenizing (nothing half-built is kept).
        """
        with signals.interruptible(signals.DATA_PREPARATION):
            token_data = build_token_data(self.corpus, self.sources, self.tokenizer, self.prepared_dir)
        for name, cache in token_data.items():
            validation_blocks(self.corpus, cache, name if self.is_mixture else None)
        return token_data

    def setup(self, stage: str) -> None:
        """Opens the token data (or the document stream) on every process.

        Raises:
            StopRequested: When a held preemption signal reached any rank, or interrupted the data
                preparation: all ranks stop here together, before anything is trained.
        """
        self._stop_if_requested()
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
            if self.corpus.streaming_val_docs > 0:
                self._val_blocks = PackedBlocks(val_tokens, seq_len, "validation")
            return
        caches = open_token_data(self.corpus, self.sources, self.tokenizer, self.prepared_dir)
        if self.corpus.val_fraction == 0:
            rank_zero_info("data.corpus.val_fraction=0: no document is held out, so the run logs no validation loss")
        if not self.is_mixture:
            cache = caches[SINGLE_CORPUS_NAME]
            self._train_blocks = PackedBlocks(cache.train_tokens, seq_len, "train")
            self._val_blocks = validation_blocks(self.corpus, cache)
            return
        train = {name: PackedBlocks(cache.train_tokens, seq_len, "train", name) for name, cache in caches.items()}
        self._train_blocks = MixtureBlocks(list(train.values()))
        validation = {name: validation_blocks(self.corpus, cache, name) for name, cache in caches.items()}
        self._val_blocks_by_source = {name: blocks for name, blocks in validation.items() if blocks is not None}
        assert self.mixture_weights is not None
        sources = [MixtureSource(name, self.mixture_weights[name], len(blocks)) for name, blocks in train.items()]
        self._schedule = MixtureSchedule(sources, self.corpus.shuffle_seed)
        if self._restored_state is not None:
            self._restore_mixture(self._restored_state)

    def _stop_if_requested(self) -> None:
        interrupted = self._interrupted
        if interrupted is not None:
            request: tuple[int, str] | None = (int(interrupted.signum), interrupted.during)
        else:
            pending = signals.pending_stop()
            request = None if pending is None else (int(pending), "start-up")
        if self.trainer is not None and signals.holding():
            # A collective: the ranks agree, so none is left waiting in one that the others never enter.
            # Every rank of a run holds the same signals, so they all take this branch or none does.
            request = next((r for r in all_gather_objects(self.trainer, request) if r is not None), None)
        if request is not None:
            self._interrupted = None
            raise signals.StopRequested(*request)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, rank-sharded, resumable batches (endless in streaming mode)."""
        if self._stream is not None:
            return DataLoader(self._stream, batch_size=self.batch_size, pin_memory=self._pin_memory())
        assert self._train_blocks is not None, "setup() must run before train_dataloader()"
        if self._sampler is None:
            self._sampler = self._make_sampler()
            if self._restored_state is not None and isinstance(self._sampler, TrainingSampler):
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

    def _make_sampler(self) -> TrainingSampler | MixtureSampler:
        rank, world_size = self._rank_and_world_size()
        sampler: TrainingSampler | MixtureSampler
        if self._schedule is not None:
            assert isinstance(self._train_blocks, MixtureBlocks)
            sampler = MixtureSampler(self._train_blocks, self._schedule, num_replicas=world_size, rank=rank)
            what = f"all {len(self._schedule.sources)} sources have {len(self._train_blocks)} examples"
        else:
            assert isinstance(self._train_blocks, PackedBlocks)
            sampler = TrainingSampler(
                self._train_blocks, num_replicas=world_size, rank=rank, seed=self.corpus.shuffle_seed
            )
            what = f"the train split has {len(self._train_blocks)} examples"
        if sampler.num_samples < self.batch_size:
            raise ConfigError(
                f"{what} of data.corpus.seq_len={self.corpus.seq_len} + 1 tokens, {sampler.num_samples} per rank "
                f"on {world_size} ranks, fewer than batch_size={self.batch_size}; lower batch_size or "
                "data.corpus.seq_len, or add documents"
            )
        return sampler

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation blocks in order, sharded across ranks; empty when nothing is held out.

        A mixture gets one loader per source with held-out documents, in :attr:`validation_sources`
        order. Each rank gets ``len // world_size`` blocks, so up to world_size - 1 trailing blocks are
        not evaluated (padding by repetition, as DistributedSampler does, would bias the loss instead).
        """
        if self.is_mixture:
            return [self._val_loader(blocks) for blocks in self._val_blocks_by_source.values()]
        if self._val_blocks is None:
            return []
        return self._val_loader(self._val_blocks)

    @property
    def validation_sources(self) -> list[str] | None:
        """Source of each validation loader of a mixture, in loader order; None for a single corpus."""
        return list(self._val_blocks_by_source) if self.is_mixture else None

    def _val_loader(self, blocks: PackedBlocks) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        sampler = ResumableDistributedSampler(blocks, num_replicas=world_size, rank=rank, shuffle=False)
        # The stream's held-out set is small and in memory, so its loader needs no workers either.
        num_workers = 0 if self.corpus.streaming else self.num_workers
        return DataLoader(
            blocks,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=self._pin_memory(),
            persistent_workers=num_workers > 0,
        )

    def mixture_metrics(self) -> dict[str, float]:
        """Per-source progress of a mixture, over all ranks: ``data/tokens/<source>`` (training tokens
        drawn, i.e. predicted targets) and ``data/epoch/<source>`` (passes over the source, fractional);
        empty for a single corpus."""
        if self._schedule is None:
            return {}
        metrics = {}
        schedule = self._schedule
        for index, name in enumerate(schedule.names):
            metrics[f"data/tokens/{name}"] = float(schedule.consumed[index] * self.corpus.seq_len)
            metrics[f"data/epoch/{name}"] = float(schedule.consumed[index] / schedule.sizes[index])
        return metrics

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts a training batch as consumed; Lightning calls this just before ``training_step``."""
        trainer = self.trainer
        # ModelSummary and TensorBoard graph logging also pass the module's example_input_array
        # through this hook while trainer.training is set; that is not a consumed batch.
        if trainer is None or not trainer.training or batch is trainer.lightning_module.example_input_array:
            return batch
        if self._stream is not None:
            self._stream.advance(len(batch))
        elif self._schedule is not None:
            started = self._schedule.advance(len(batch) * self._rank_and_world_size()[1])
            log_new_epochs(started, self._schedule)
        elif self._sampler is not None:
            self._sampler.advance(len(batch))
            self._start_next_epoch_if_exhausted()
        return batch

    def _start_next_epoch_if_exhausted(self) -> None:
        # Moving on as soon as no full batch is left (rather than when the iterator ends) makes a
        # checkpoint taken after an epoch's last batch resume in the next epoch.
        assert isinstance(self._sampler, TrainingSampler)
        if self._sampler.remaining < self.batch_size:
            self._sampler.start_next_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Returns the training position, stored by Lightning in every checkpoint.

        Token cache mode: ``{"epoch", "consumed", "num_replicas"}`` (identical on every rank); empty
        before the train dataloader exists.
        Mixture: ``{"mixture": {"seed", "sources": [{name, weight, share, num_examples, consumed, epoch,
        segment_start}, ...]}}`` (identical on every rank, independent of their number).
        Streaming mode: ``{"streams": [state of rank 0, rank 1, ...]}``, gathered from all ranks, since
        Lightning writes only rank 0's copy; every rank calls this while saving a checkpoint.
        """
        if self._stream is not None:
            return {"streams": self._gather_across_ranks(self._stream.state_dict())}
        if self._schedule is not None:
            return {"mixture": self._schedule.state_dict()}
        if isinstance(self._sampler, TrainingSampler):
            return {**self._sampler.state_dict(), "num_replicas": self._sampler.num_replicas}
        # Nothing consumed yet (Lightning then stores no entry), or a restored position not yet applied.
        return self._restored_state or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`; applied as soon as the sampler or stream exists.

        Raises:
            ConfigError: If the checkpoint comes from the other mode (streaming, mixture or a single
                token cache), a streaming checkpoint from a different number of ranks, or a mixture
                that differs from the recipe's (unless ``allow_mixture_change``).
        """
        if ("streams" in state_dict) != self.corpus.streaming:
            raise ConfigError(
                f"the checkpoint's data position was saved with data.corpus.streaming={'streams' in state_dict} "
                f"but data.corpus.streaming={self.corpus.streaming}; resume with the setting the run started with"
            )
        if ("mixture" in state_dict) != self.is_mixture:
            saved, current = ("a mixture (data.corpora)", "a single data.corpus")
            if self.is_mixture:
                saved, current = current, saved
            raise ConfigError(
                f"the checkpoint's data position belongs to {saved} but this recipe trains on {current}; resume "
                "with the data settings the run started with, or start a new run (model.init_from keeps the weights)"
            )
        self._restored_state = state_dict
        if self._stream is not None:
            self._restore_stream(state_dict)
        if self._schedule is not None:
            self._restore_mixture(state_dict)
        if isinstance(self._sampler, TrainingSampler):
            self._restore_sampler(state_dict)

    def _restore_mixture(self, state: dict[str, Any]) -> None:
        assert self._schedule is not None
        differences = self._schedule.load_state_dict(state["mixture"], self.allow_mixture_change)
        if differences:
            log.warning(
                "data.allow_mixture_change=true: continuing with a mixture that differs from the checkpoint's:\n  %s",
                "\n  ".join(differences),
            )
        # Applied once: a second load_state_dict call (or none) must not reapply an old position.
        self._restored_state = None

    def _restore_sampler(self, state: dict[str, Any]) -> None:
        assert isinstance(self._sampler, TrainingSampler)
        self._sampler.restore(state["epoch"], state["consumed"], state["num_replicas"])
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
