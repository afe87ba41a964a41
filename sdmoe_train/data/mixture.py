"""Weighted corpus mixtures: a deterministic blended schedule, per-source repetition and exact resume.

The blend follows Megatron-Core's blended datasets (``build_blending_indices``): the n-th training
example of the run (counted over all ranks) is drawn from the source that lags its target share the
most, ``argmax_s  w_s * (n + 1) - c_s``, where ``w_s`` are the normalised weights and ``c_s`` the
examples already drawn from source s (ties go to the source listed first). No random numbers are
involved, so after any number of examples every source's count is within one example of its share.

Inside a source, its k-th draw is example ``perm_e[k mod N_s]`` with ``e = k // N_s`` its epoch and
``perm_e`` a permutation of its ``N_s`` examples seeded by (shuffle seed, source name, epoch). A
source that runs out therefore starts its next epoch in a new order while the others continue, and the
mixture never changes. Rank r of R takes the examples ``r, r + R, r + 2R, ...`` of the global sequence,
so ranks never share an example, and the whole position is the per-source counts: the same on every
rank, independent of the number of ranks, and enough to resume at the exact next example.

When the weights of a resumed run are allowed to change (``data.allow_mixture_change``), the counts
at the resume point become the start of a new segment: deficits are measured from there, so the new
weights hold for the examples after the resume instead of being made up for in a burst.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.errors import ConfigError

log = logging.getLogger(__name__)

_DRAW_CHUNK = 4096
"""Global examples planned at a time while iterating."""


@dataclass(frozen=True)
class MixtureSource:
    """One source as the schedule sees it."""

    name: str
    """Source name (``data.corpora[*].name``)."""
    weight: float
    """Recipe weight (any positive scale)."""
    num_examples: int
    """Training examples of seq_len + 1 tokens in the source (one epoch)."""


class MixtureBlocks(Dataset[torch.Tensor]):
    """The training blocks of all sources behind one flat index: source s owns ``[offset_s, offset_s + N_s)``."""

    def __init__(self, sources: Sequence[PackedBlocks]) -> None:
        """Concatenates the sources' index ranges in order.

        Args:
            sources: One :class:`PackedBlocks` per source, in mixture order.
        """
        self.sources = list(sources)
        self.offsets = np.concatenate([[0], np.cumsum([len(blocks) for blocks in self.sources])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        """Returns flat example ``index`` as an int64 tensor of shape (seq_len + 1,)."""
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.sources[source][index - int(self.offsets[source])]


class MixtureSchedule:
    """Which source and which of its examples every global training example uses, and the position.

    The position is ``consumed`` (examples drawn from each source so far, over all ranks and epochs)
    and ``segment_start`` (the counts at which the current weights took effect).
    """

    def __init__(self, sources: Sequence[MixtureSource], seed: int) -> None:
        """Starts the schedule at the beginning of every source.

        Args:
            sources: The sources in recipe order.
            seed: Seed of the per-source, per-epoch example orders.
        """
        self.sources = list(sources)
        self.seed = seed
        weights = np.array([source.weight for source in self.sources], dtype=np.float64)
        self.shares = weights / weights.sum()
        self.sizes = np.array([source.num_examples for source in self.sources], dtype=np.int64)
        self.consumed = np.zeros(len(self.sources), dtype=np.int64)
        self.segment_start = np.zeros(len(self.sources), dtype=np.int64)
        self._keys = [int.from_bytes(hashlib.sha256(s.name.encode()).digest()[:8], "little") for s in self.sources]
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return [source.name for source in self.sources]

    @property
    def total_consumed(self) -> int:
        """Global training examples drawn so far (all ranks)."""
        return int(self.consumed.sum())

    def epochs(self, consumed: np.ndarray | None = None) -> np.ndarray:
        """The epoch each source is in (0 for the first pass over it)."""
        return (self.consumed if consumed is None else consumed) // self.sizes

    def plan(self, count: int, consumed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plans the next ``count`` global examples without moving the position.

        Args:
            count: Global examples to plan.
            consumed: Per-source counts to plan from; None is the current position.

        Returns:
            The source of each example, its example index within that source, and the per-source
            counts after them.
        """
        counts = (self.consumed if consumed is None else consumed).copy()
        sources, after = self._plan_sources(count, counts)
        examples = np.empty(count, dtype=np.int64)
        for source in np.unique(sources):
            where = np.flatnonzero(sources == source)
            examples[where] = self._examples(int(source), counts[source] + np.arange(len(where)))
        return sources, examples, after

    def _plan_sources(self, count: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sources = np.array(
            _blend_sources(self.shares.tolist(), (counts - self.segment_start).tolist(), count), dtype=np.int64
        )
        return sources, counts + np.bincount(sources, minlength=len(self.sources))

    def _examples(self, source: int, draws: np.ndarray) -> np.ndarray:
        size = int(self.sizes[source])
        epochs, positions = draws // size, draws % size
        out = np.empty(len(draws), dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._order(source, int(epoch))[positions[where]]
        return out

    def _order(self, source: int, epoch: int) -> np.ndarray:
        # Two epochs per source stay cached: the loader plans ahead into the next epoch while the
        # consumed position is still in the current one.
        order = self._orders.get((source, epoch))
        if order is None:
            sequence = np.random.SeedSequence([self.seed, self._keys[source], epoch])
            order = np.random.Generator(np.random.PCG64(sequence)).permutation(int(self.sizes[source]))
            for key in [key for key in self._orders if key[0] == source and key[1] < epoch - 1]:
                del self._orders[key]
            self._orders[(source, epoch)] = order
        return order

    def advance(self, count: int) -> list[tuple[str, int]]:
        """Marks the next ``count`` global examples as drawn.

        Returns:
            ``(source name, new epoch)`` for every source that started a new epoch (repeats its data).
        """
        before = self.epochs()
        _, self.consumed = self._plan_sources(count, self.consumed)
        after = self.epochs()
        return [(self.sources[i].name, int(after[i])) for i in np.flatnonzero(after > before)]

    def state_dict(self) -> dict[str, Any]:
        """The position, with the mixture it belongs to: ``{"seed", "sources": [{name, weight, share,
        num_examples, consumed, epoch, segment_start}, ...]}``."""
        return {
            "seed": self.seed,
            "sources": [
                {
                    "name": source.name,
                    "weight": source.weight,
                    "share": float(self.shares[i]),
                    "num_examples": source.num_examples,
                    "consumed": int(self.consumed[i]),
                    "epoch": int(self.consumed[i] // self.sizes[i]),
                    "segment_start": int(self.segment_start[i]),
                }
                for i, source in enumerate(self.sources)
            ],
        }

    def load_state_dict(self, state: dict[str, Any], allow_change: bool) -> list[str]:
        """Restores a position saved by :meth:`state_dict`.

        Args:
            state: The saved position.
            allow_change: Continue when sources, weights or source sizes differ from the saved ones
                (``data.allow_mixture_change``); otherwise such a difference is an error.

        Returns:
            The differences found (empty when the mixture is unchanged).

        Raises:
            ConfigError: If the mixture differs and ``allow_change`` is false, listing every difference.
        """
        saved = {entry["name"]: entry for entry in state["sources"]}
        differences = mixture_differences(saved, self.sources, self.shares)
        if state["seed"] != self.seed:
            differences.append(
                f"data.corpus.shuffle_seed: checkpoint {state['seed']} != recipe {self.seed} (it orders every source)"
            )
        if differences and not allow_change:
            raise ConfigError(
                "cannot resume: the data mixture differs from the checkpoint's in "
                f"{len(differences)} point(s):\n  " + "\n  ".join(differences) + "\nrestore the recipe's "
                "data.corpora, or set data.allow_mixture_change=true to continue with the new mixture (sources "
                "kept resume at their positions, new ones start at their beginning, and the new weights apply "
                "from the resume point on; see docs/data.md)"
            )
        for index, source in enumerate(self.sources):
            entry = saved.get(source.name)
            self.consumed[index] = 0 if entry is None else entry["consumed"]
            self.segment_start[index] = 0 if entry is None else entry["segment_start"]
        if differences:
            # A new segment: the new weights are measured from here, not made up for retroactively.
            self.segment_start = self.consumed.copy()
        return differences


def _blend_sources(shares: list[float], in_segment: list[int], count: int) -> list[int]:
    """The source of each of the next ``count`` examples: the one furthest below its share (first on ties).

    Plain Python floats (IEEE float64, as numpy's) are ten times faster than a numpy call per example for
    the few sources of a mixture; deficits stay exact to far below one example for any realistic run.
    """
    drawn = sum(in_segment)
    chosen = [0] * count
    for position in range(count):
        target = drawn + position + 1
        best, best_deficit = 0, shares[0] * target - in_segment[0]
        for source in range(1, len(shares)):
            deficit = shares[source] * target - in_segment[source]
            if deficit > best_deficit:
                best, best_deficit = source, deficit
        chosen[position] = best
        in_segment[best] += 1
    return chosen


def mixture_differences(
    saved: dict[str, dict[str, Any]], sources: Sequence[MixtureSource], shares: np.ndarray
) -> list[str]:
    """Human-readable differences between a saved mixture and the current one.

    Weights count as changed only when the shares they give change (``[1, 1]`` equals ``[2, 2]``).
    """
    current = {source.name: (source, float(share)) for source, share in zip(sources, shares, strict=True)}
    differences = [f"source {name!r} is in the checkpoint but not in data.corpora" for name in saved.keys() - current]
    shares_changed = saved.keys() != current.keys() or any(
        not math.isclose(saved[name]["share"], share, rel_tol=1e-9, abs_tol=1e-12)
        for name, (_, share) in current.items()
    )
    for name, (source, _) in current.items():
        entry = saved.get(name)
        if entry is None:
            differences.append(f"source {name!r} is in data.corpora but not in the checkpoint")
            continue
        if shares_changed and entry["weight"] != source.weight:
            differences.append(
                f"data.corpora[{name}].weight: checkpoint {entry['weight']!r} != recipe {source.weight!r}"
            )
        if entry["num_examples"] != source.num_examples:
            differences.append(
                f"source {name!r} has {source.num_examples} training examples but had {entry['num_examples']} "
                "(its documents, data.corpus.seq_len or data.corpus.val_fraction changed)"
            )
    if shares_changed:
        before = ", ".join(f"{name} {entry['share']:.4g}" for name, entry in saved.items())
        after = ", ".join(f"{name} {share:.4g}" for name, (_, share) in current.items())
        differences.append(f"mixture shares: checkpoint {before} != recipe {after}")
    return differences


class MixtureSampler(DistributedSampler):
    """Flat indices into :class:`MixtureBlocks` for one rank, following a :class:`MixtureSchedule`.

    Like :class:`~sdmoe_train.data.sampler.ResumableDistributedSampler`, it never moves the position
    itself: the data module advances the schedule by the batches training really consumed. A
    Lightning epoch is one pass's worth of examples (all sources' examples once, split over the ranks);
    the mixture itself never ends.
    """

    def __init__(self, dataset: MixtureBlocks, schedule: MixtureSchedule, *, num_replicas: int, rank: int) -> None:
        """Creates the sampler of rank ``rank`` of ``num_replicas``."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)  # type: ignore[arg-type]
        self.schedule = schedule
        self.offsets = dataset.offsets
        self.num_samples = len(dataset) // num_replicas
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        """Yields this rank's next ``len(self)`` flat indices, starting at the consumed position."""
        consumed = self.schedule.consumed
        remaining = self.num_samples
        while remaining > 0:
            count = min(_DRAW_CHUNK, remaining) * self.num_replicas
            sources, examples, consumed = self.schedule.plan(count, consumed)
            flat = self.offsets[sources] + examples
            mine = flat[self.rank :: self.num_replicas]
            yield from mine.tolist()
            remaining -= len(mine)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Ignores Lightning's epoch counter: the schedule alone decides what comes next."""


def log_new_epochs(started: list[tuple[str, int]], schedule: MixtureSchedule) -> None:
    """Reports every source that just started repeating its data."""
    for name, epoch in started:
        log.info(
            "data source %r starts epoch %d (its examples repeat in a new order) after %d global examples; "
            "the mixture weights are unchanged",
            name,
            epoch,
            schedule.total_consumed,
        )
