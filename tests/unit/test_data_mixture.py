"""Mixture schedule and sampler: shares follow the weights, sources repeat on their own, ranks are disjoint,
the position resumes exactly, and a changed mixture is refused unless allowed."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sdmoe_train.data.mixture import MixtureBlocks, MixtureSampler, MixtureSchedule, MixtureSource, log_new_epochs
from sdmoe_train.data.packing import PackedBlocks
from sdmoe_train.errors import ConfigError

SOURCES = [MixtureSource("web", 5.0, 400), MixtureSource("code", 3.0, 120), MixtureSource("books", 2.0, 7)]


def _schedule(sources: list[MixtureSource] = SOURCES, seed: int = 3) -> MixtureSchedule:
    return MixtureSchedule(sources, seed)


def test_every_prefix_of_the_blend_is_within_one_example_of_the_weights() -> None:
    schedule = _schedule()
    sources, _, counts = schedule.plan(2000)
    shares = np.array([0.5, 0.3, 0.2])
    running = np.zeros(3)
    for position, source in enumerate(sources, start=1):
        running[source] += 1
        assert np.all(np.abs(running - shares * position) < 1.0), (position, running)
    np.testing.assert_array_equal(counts, [1000, 600, 400])


def test_blend_is_deterministic_and_does_not_move_the_position() -> None:
    first, second = _schedule(), _schedule()
    np.testing.assert_array_equal(first.plan(500)[1], second.plan(500)[1])
    assert first.total_consumed == 0
    assert not np.array_equal(first.plan(500)[1], _schedule(seed=4).plan(500)[1]), "the seed orders the examples"


def test_a_source_that_runs_out_repeats_in_a_new_order_without_changing_the_mixture(
    caplog: pytest.LogCaptureFixture,
) -> None:
    schedule = _schedule()
    books = 2
    sources, examples, _ = schedule.plan(100)
    drawn = examples[sources == books]
    assert len(drawn) == 20  # 20 % of 100, although the source holds only 7 examples
    epochs = [drawn[start : start + 7] for start in (0, 7)]
    assert all(sorted(epoch.tolist()) == list(range(7)) for epoch in epochs), "each epoch is a permutation"
    assert not np.array_equal(epochs[0], epochs[1]), "the next epoch is shuffled anew"
    with caplog.at_level(logging.INFO, logger="sdmoe_train.data.mixture"):
        started = schedule.advance(100)
        log_new_epochs(started, schedule)
    assert started == [("books", 2)]
    assert "data source 'books' starts epoch 2" in caplog.text
    np.testing.assert_array_equal(schedule.epochs(), [0, 0, 2])


def test_resumed_schedule_plans_exactly_what_the_uninterrupted_one_does() -> None:
    uninterrupted = _schedule()
    expected = uninterrupted.plan(300)
    first = _schedule()
    first.advance(123)
    resumed = _schedule()
    assert resumed.load_state_dict(first.state_dict(), allow_change=False) == []
    continued = resumed.plan(177)
    for whole, rest in zip(expected, continued[:2], strict=False):
        np.testing.assert_array_equal(whole[123:], rest)
    np.testing.assert_array_equal(continued[2], expected[2])


def _blocks(sizes: list[int], seq_len: int = 4) -> MixtureBlocks:
    start, parts = 0, []
    for size in sizes:
        tokens = np.arange(start, start + size * seq_len + 1)
        parts.append(PackedBlocks(tokens, seq_len))
        start += 10_000
    return MixtureBlocks(parts)


def test_flat_index_maps_to_the_right_source_example() -> None:
    blocks = _blocks([3, 2])
    assert len(blocks) == 5
    assert blocks[0][0] == 0 and blocks[2][0] == 8
    assert blocks[3][0] == 10_000 and blocks[4][0] == 10_004


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_take_disjoint_interleaved_examples_of_the_global_blend(ranks: int) -> None:
    sizes = [source.num_examples for source in SOURCES]
    blocks = _blocks(sizes)
    schedule = _schedule()
    per_rank = [list(MixtureSampler(blocks, schedule, num_replicas=ranks, rank=rank))[:60] for rank in range(ranks)]
    sources, examples, _ = schedule.plan(60 * ranks)
    global_flat = (blocks.offsets[sources] + examples).tolist()
    for rank in range(ranks):
        assert per_rank[rank] == global_flat[rank::ranks]
    assert len(MixtureSampler(blocks, schedule, num_replicas=ranks, rank=0)) == sum(sizes) // ranks


def test_position_does_not_depend_on_the_number_of_ranks() -> None:
    blocks = _blocks([source.num_examples for source in SOURCES])
    two_ranks = _schedule()
    two_ranks.advance(2 * 8)  # one step of 8 examples on each of 2 ranks
    resumed = _schedule()
    resumed.load_state_dict(two_ranks.state_dict(), allow_change=False)
    one_rank = list(MixtureSampler(blocks, resumed, num_replicas=1, rank=0))[:20]
    sources, examples, _ = _schedule().plan(36)
    assert one_rank == (blocks.offsets[sources] + examples).tolist()[16:]


def test_changed_weights_are_refused_naming_old_and_new() -> None:
    saved = _schedule()
    saved.advance(50)
    changed = [MixtureSource("web", 5.0, 400), MixtureSource("code", 1.0, 120), MixtureSource("books", 2.0, 7)]
    with pytest.raises(ConfigError) as error:
        _schedule(changed).load_state_dict(saved.state_dict(), allow_change=False)
    message = str(error.value)
    assert "data.corpora[code].weight: checkpoint 3.0 != recipe 1.0" in message
    assert (
        "mixture shares: checkpoint web 0.5, code 0.3, books 0.2 != recipe web 0.625, code 0.125, books 0.25" in message
    )
    assert "data.allow_mixture_change=true" in message
    assert "data.corpora[web]" not in message


def test_another_shuffle_seed_is_a_change() -> None:
    saved = _schedule(seed=3)
    saved.advance(10)
    with pytest.raises(ConfigError, match=r"data\.corpus\.shuffle_seed: checkpoint 3 != recipe 4"):
        _schedule(seed=4).load_state_dict(saved.state_dict(), allow_change=False)


def test_same_shares_at_another_scale_are_not_a_change() -> None:
    saved = _schedule()
    saved.advance(10)
    scaled = [MixtureSource(s.name, s.weight * 10, s.num_examples) for s in SOURCES]
    assert _schedule(scaled).load_state_dict(saved.state_dict(), allow_change=False) == []


def test_added_removed_and_resized_sources_are_listed() -> None:
    saved = _schedule()
    saved.advance(10)
    changed = [MixtureSource("web", 5.0, 401), MixtureSource("code", 3.0, 120), MixtureSource("math", 2.0, 9)]
    with pytest.raises(ConfigError) as error:
        _schedule(changed).load_state_dict(saved.state_dict(), allow_change=False)
    message = str(error.value)
    assert "source 'books' is in the checkpoint but not in data.corpora" in message
    assert "source 'math' is in data.corpora but not in the checkpoint" in message
    assert "source 'web' has 401 training examples but had 400" in message


def test_allowed_change_keeps_positions_and_applies_new_weights_from_the_resume_point() -> None:
    saved = _schedule()
    saved.advance(100)
    positions = saved.state_dict()["sources"]
    changed = [MixtureSource("web", 1.0, 400), MixtureSource("code", 1.0, 120), MixtureSource("new", 2.0, 50)]
    resumed = _schedule(changed)
    differences = resumed.load_state_dict(saved.state_dict(), allow_change=True)
    # books removed, new added, web's and code's weights, the shares.
    assert len(differences) == 5, differences
    assert resumed.consumed.tolist() == [positions[0]["consumed"], positions[1]["consumed"], 0]
    sources, _, counts = resumed.plan(400)
    # The new shares hold for the examples after the resume, not for the run as a whole.
    np.testing.assert_array_equal(np.bincount(sources, minlength=3), [100, 100, 200])
    assert counts.tolist() == [positions[0]["consumed"] + 100, positions[1]["consumed"] + 100, 200]
