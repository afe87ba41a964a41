"""ResumableDistributedSampler: even disjoint shards, seeded epochs and exact mid-epoch resume."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from sdmoe_train.data.sampler import ResumableDistributedSampler
from sdmoe_train.errors import ConfigError

DATASET = range(103)


def _epoch(sampler: ResumableDistributedSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("num_replicas", [1, 2, 4, 7])
def test_shards_are_equal_disjoint_and_cover_the_truncated_permutation(num_replicas: int) -> None:
    shards = [
        _epoch(ResumableDistributedSampler(DATASET, num_replicas=num_replicas, rank=rank, seed=5), 2)
        for rank in range(num_replicas)
    ]
    per_rank = len(DATASET) // num_replicas
    assert all(len(shard) == per_rank for shard in shards)
    union = {index for shard in shards for index in shard}
    assert len(union) == per_rank * num_replicas
    # Interleaving: position j of rank r is position j * R + r of one global permutation.
    permutation = _epoch(ResumableDistributedSampler(DATASET, seed=5), 2)
    interleaved = [shards[rank][j] for j in range(per_rank) for rank in range(num_replicas)]
    assert interleaved == permutation[: per_rank * num_replicas]


def test_permutation_depends_only_on_seed_and_epoch() -> None:
    first = _epoch(ResumableDistributedSampler(DATASET, seed=1), 3)
    assert first == _epoch(ResumableDistributedSampler(DATASET, seed=1), 3)
    assert sorted(first) == list(DATASET)
    assert first != _epoch(ResumableDistributedSampler(DATASET, seed=1), 4)
    assert first != _epoch(ResumableDistributedSampler(DATASET, seed=2), 3)
    # Unlike seed + epoch, (seed=1, epoch=0) does not replay (seed=0, epoch=1).
    assert _epoch(ResumableDistributedSampler(DATASET, seed=1), 0) != _epoch(
        ResumableDistributedSampler(DATASET, seed=0), 1
    )


def test_unshuffled_sampler_keeps_natural_order() -> None:
    sampler = ResumableDistributedSampler(range(10), num_replicas=3, rank=1, shuffle=False)
    assert list(sampler) == [1, 4, 7]


def test_iteration_does_not_move_the_position() -> None:
    sampler = ResumableDistributedSampler(DATASET, seed=0)
    assert list(sampler) == list(sampler)
    assert sampler.state_dict() == {"epoch": 0, "consumed": 0}
    assert len(sampler) == len(DATASET)


@pytest.mark.parametrize("consumed_batches", [0, 1, 5, 12])
def test_restored_sampler_yields_exactly_the_remaining_indices(consumed_batches: int) -> None:
    batch = 4
    sampler = ResumableDistributedSampler(DATASET, num_replicas=2, rank=1, seed=9)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.advance(consumed_batches * batch)

    fresh = ResumableDistributedSampler(DATASET, num_replicas=2, rank=1, seed=9)
    fresh.load_state_dict(sampler.state_dict())
    assert fresh.state_dict() == {"epoch": 1, "consumed": consumed_batches * batch}
    assert list(fresh) == full[consumed_batches * batch :]
    # Lightning calls set_epoch with the restored epoch again; that must not rewind.
    fresh.set_epoch(1)
    assert list(fresh) == full[consumed_batches * batch :]


def _train(sampler: ResumableDistributedSampler, batch: int, steps: int) -> list[list[int]]:
    """A training loop taking `steps` full batches, advancing the sampler only after using one."""
    seen: list[list[int]] = []
    while len(seen) < steps:
        indices = list(sampler)
        for start in range(0, len(indices) - batch + 1, batch):
            seen.append(indices[start : start + batch])
            sampler.advance(batch)
            if len(seen) == steps:
                break
        else:
            sampler.set_epoch(sampler.epoch + 1)
    return seen


@pytest.mark.parametrize("interrupt_at", [1, 7, 12, 13, 20])
def test_interrupted_and_resumed_run_sees_the_uninterrupted_batches(interrupt_at: int) -> None:
    batch, steps = 4, 30  # 103 // 2 = 51 indices per rank: 12 batches per epoch, 3 indices dropped.
    uninterrupted = _train(ResumableDistributedSampler(DATASET, num_replicas=2, rank=0, seed=4), batch, steps)

    first = ResumableDistributedSampler(DATASET, num_replicas=2, rank=0, seed=4)
    before = _train(first, batch, interrupt_at)
    second = ResumableDistributedSampler(DATASET, num_replicas=2, rank=0, seed=4)
    second.load_state_dict(first.state_dict())
    after = _train(second, batch, steps - interrupt_at)
    assert before + after == uninterrupted
    assert len({index for indices in uninterrupted[:12] for index in indices}) == 12 * batch


def test_new_epoch_starts_from_the_beginning() -> None:
    sampler = ResumableDistributedSampler(DATASET, seed=0)
    sampler.advance(10)
    sampler.set_epoch(1)
    assert sampler.state_dict() == {"epoch": 1, "consumed": 0}
    assert len(list(sampler)) == len(DATASET)


def test_advancing_past_the_shard_raises() -> None:
    sampler = ResumableDistributedSampler(range(10), num_replicas=2, rank=0)
    sampler.advance(5)
    with pytest.raises(ValueError, match="cannot advance by 1: 0 indices left"):
        sampler.advance(1)


def test_position_beyond_the_shard_is_a_config_error() -> None:
    sampler = ResumableDistributedSampler(range(10), num_replicas=2, rank=0)
    with pytest.raises(ConfigError, match="consumed=6 lies outside this rank's shard of 5"):
        sampler.load_state_dict({"epoch": 0, "consumed": 6})


def test_is_a_distributed_sampler_so_lightning_does_not_reshard_it() -> None:
    # Lightning's use_distributed_sampler wraps every sampler that is not a DistributedSampler.
    assert isinstance(ResumableDistributedSampler(DATASET), DistributedSampler)
