"""Distributed sampler that can resume in the middle of an epoch at the exact next example.

The position (epoch and examples of this rank's shard already consumed) is advanced by the
caller when batches are really used by the training loop, never inside ``__iter__``: DataLoader
workers and Lightning's fetcher draw indices ahead of training, so counting there would skip the
prefetched examples on resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from sdmoe_train.errors import ConfigError

log = logging.getLogger(__name__)


# Subclassing DistributedSampler (not only Sampler) matters under Lightning: with
# use_distributed_sampler=True it wraps any other sampler in DistributedSamplerWrapper and would
# shard our already-sharded indices a second time; DistributedSampler instances are left alone.
class ResumableDistributedSampler(DistributedSampler):
    """Seeded per-epoch permutation, split evenly across ranks, resumable mid-epoch.

    Rank ``r`` of ``R`` takes positions ``r, r + R, r + 2R, ...`` of the epoch's permutation after
    truncating it to a multiple of ``R``, so every rank gets the same number of indices and, after
    each rank consumed ``k`` indices, exactly the first ``k * R`` positions have been used.
    """

    def __init__(
        self, dataset: Sized, *, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True
    ) -> None:
        """Creates the sampler at epoch 0 with nothing consumed.

        Args:
            dataset: Anything with ``len``; indices are drawn from ``range(len(dataset))``.
            num_replicas: Data-parallel ranks sharing the dataset.
            rank: This process's rank in ``[0, num_replicas)``.
            seed: Seed of the permutations; the same on every rank.
            shuffle: Permute every epoch; False keeps the natural order (validation).
        """
        # torch annotates Dataset, but DistributedSampler only takes len() of it.
        super().__init__(
            dataset,  # type: ignore[arg-type]
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self.num_examples = len(dataset)
        # DistributedSampler(drop_last=True) drops a whole extra round when len is divisible by R.
        self.num_samples = self.num_examples // num_replicas
        self.total_size = self.num_samples * num_replicas
        self.consumed = 0

    def __iter__(self) -> Iterator[int]:
        """Yields the indices of this rank's shard for the current epoch that are not yet consumed."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_examples, generator=generator)
        else:
            order = torch.arange(self.num_examples)
        shard = order[: self.total_size][self.rank :: self.num_replicas]
        return iter(shard[self.consumed :].tolist())

    def __len__(self) -> int:
        # The whole shard, not what remains: Lightning sizes the epoch from len(dataloader) and, on a
        # mid-epoch restart, keeps counting batches from the restored batch index.
        return self.num_samples

    @property
    def remaining(self) -> int:
        """Indices of this rank's shard left in the current epoch."""
        return self.num_samples - self.consumed

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's permutation; moving to a different epoch starts it from the beginning.

        Setting the current epoch again keeps the position, so the per-epoch call Lightning makes
        after a checkpoint was restored does not rewind a resumed epoch.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def advance(self, num_indices: int) -> None:
        """Marks the next ``num_indices`` indices of this rank's shard as consumed by training.

        Raises:
            ValueError: If that would go past the end of the shard.
        """
        if not 0 <= num_indices <= self.remaining:
            raise ValueError(f"cannot advance by {num_indices}: {self.remaining} indices left in epoch {self.epoch}")
        self.consumed += num_indices

    def state_dict(self) -> dict[str, int]:
        """Returns the resume position: ``{"epoch": ..., "consumed": ...}``."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores a position saved by :meth:`state_dict`; the next ``__iter__`` continues from it.

        Raises:
            ConfigError: If the position lies beyond this rank's shard (the data changed).
        """
        if not 0 <= state["consumed"] <= self.num_samples:
            raise ConfigError(
                f"saved sampler position consumed={state['consumed']} lies outside this rank's shard of "
                f"{self.num_samples} examples; the data or data.corpus.seq_len changed since the checkpoint"
            )
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]


class TrainingSampler(ResumableDistributedSampler):
    """The train sampler of the data module, which alone moves it to a new epoch.

    Lightning's epoch counter is not the data position (a run stopped by ``max_steps`` mid-epoch is saved as
    a finished epoch), so its ``set_epoch`` calls are ignored.
    """

    def set_epoch(self, epoch: int) -> None:
        """Ignores Lightning's epoch counter."""

    def start_next_epoch(self) -> None:
        """Moves to the next epoch's permutation, starting from its beginning."""
        super().set_epoch(self.epoch + 1)

    def restore(self, epoch: int, consumed: int, saved_replicas: int) -> None:
        """Restores a position saved on ``saved_replicas`` ranks, on this sampler's number of ranks.

        After k indices per rank on R ranks the first k * R positions of the epoch's permutation are
        used, whatever the number of ranks that follows; on fewer or more ranks the position continues
        from there, and the up to R - 1 examples the new split hands out again are logged.
        """
        if saved_replicas != self.num_replicas:
            used = consumed * saved_replicas
            consumed = used // self.num_replicas
            log.warning(
                "resuming on %d ranks from a checkpoint taken on %d: %d examples of epoch %d were used; "
                "%d of them are seen again",
                self.num_replicas,
                saved_replicas,
                used,
                epoch,
                used - consumed * self.num_replicas,
            )
        self.load_state_dict({"epoch": epoch, "consumed": consumed})


def _epoch_seed(seed: int, epoch: int) -> int:
    # seed + epoch (DistributedSampler's choice) makes (seed=1, epoch=0) replay (seed=0, epoch=1).
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
