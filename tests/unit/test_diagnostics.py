"""Specialisation diagnostics (docs/design/sdmoe.md §8) on constructed matrices whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from sdmoe_train.moe.diagnostics import (
    common_energy_share,
    gate_alignment,
    load_health,
    off_diagonal_mean_max,
    row_gram,
    subspace_similarity,
    top_direction_share,
    top_gram_eigenvectors,
    top_right_singular_vectors,
    top_singular_subspaces,
)


def _orthonormal(rows: int, cols: int, seed: int) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))).Q


def _with_bases(left_MR: Tensor, right_NR: Tensor, singular_R: Tensor) -> Tensor:
    return (left_MR * singular_R) @ right_NR.T


def test_identical_subspaces_have_similarity_one_and_orthogonal_ones_zero() -> None:
    basis = _orthonormal(32, 12, seed=0)
    first, second, third = basis[:, :4], basis[:, 4:8], basis[:, 8:]
    rotated = first @ _orthonormal(4, 4, seed=1)  # same subspace, other basis
    similarity_EE = subspace_similarity(torch.stack([first, rotated, second, third]))
    expected = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    torch.testing.assert_close(similarity_EE, expected, atol=1e-5, rtol=0)


def test_random_subspaces_have_similarity_about_rank_over_dimension() -> None:
    rows, rank, experts = 64, 4, 40
    bases_EMR = torch.stack([_orthonormal(rows, rank, seed) for seed in range(experts)])
    mean, largest = off_diagonal_mean_max(subspace_similarity(bases_EMR))
    assert mean.item() == pytest.approx(rank / rows, rel=0.15)
    assert largest.item() < 0.5


def test_partly_shared_subspaces_measure_the_shared_share() -> None:
    # Two 4-dim subspaces sharing exactly one direction: one principal cosine 1, three 0.
    basis = _orthonormal(32, 7, seed=3)
    first, second = basis[:, :4], torch.cat((basis[:, :1], basis[:, 4:7]), dim=1)
    similarity_EE = subspace_similarity(torch.stack([first, second]))
    assert similarity_EE[0, 1].item() == pytest.approx(0.25, abs=1e-5)


@pytest.mark.parametrize("method", ["full", "lowrank"])
def test_top_singular_subspaces_find_planted_left_and_right_subspaces(method: str) -> None:
    # Experts 0 and 1 share their dominant left directions but not their right ones; expert 2 shares nothing.
    shared_left = _orthonormal(24, 3, seed=0)
    rights = _orthonormal(40, 9, seed=1)
    own_left = _orthonormal(24, 6, seed=2)
    own_left = own_left - shared_left @ (shared_left.T @ own_left)
    own_left = torch.linalg.qr(own_left).Q[:, 3:6]
    singular = torch.tensor([5.0, 4.0, 3.0])
    noise = 1e-3 * torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(4))
    matrices_EMN = torch.stack(
        [
            _with_bases(shared_left, rights[:, :3], singular),
            _with_bases(shared_left, rights[:, 3:6], singular),
            _with_bases(own_left, rights[:, 6:9], singular),
        ]
    )
    left_EMR, right_ENR = top_singular_subspaces(matrices_EMN + noise, rank=3, method=method)
    left_EE, right_EE = subspace_similarity(left_EMR), subspace_similarity(right_ENR)
    assert left_EE[0, 1].item() == pytest.approx(1.0, abs=1e-3)
    assert left_EE[0, 2].item() == pytest.approx(0.0, abs=1e-3)
    assert right_EE[0, 1].item() == pytest.approx(0.0, abs=1e-3)


def test_gradients_with_a_planted_shared_direction_are_aligned_and_without_it_are_not() -> None:
    experts, rows, cols, rank = 6, 32, 48, 2
    generator = torch.Generator().manual_seed(0)
    shared = _with_bases(_orthonormal(rows, rank, 10), _orthonormal(cols, rank, 11), torch.tensor([3.0, 2.0]))
    own_EMN = 0.05 * torch.randn(experts, rows, cols, generator=generator)  # spectral norm ~0.6 < 2
    aligned, _ = off_diagonal_mean_max(subspace_similarity(top_singular_subspaces(shared + own_EMN, rank)[0]))
    unaligned, _ = off_diagonal_mean_max(subspace_similarity(top_singular_subspaces(own_EMN, rank)[0]))
    assert aligned.item() > 0.9
    assert unaligned.item() < 4 * rank / rows


def test_common_energy_share_is_one_inside_zero_outside_and_the_energy_ratio_in_between() -> None:
    rows, cols, rank = 20, 30, 3
    left_basis, right_basis = _orthonormal(rows, rows, 0), _orthonormal(cols, cols, 1)
    left_MK, right_NK = left_basis[:, :rank], right_basis[:, :rank]
    inside = left_MK @ torch.randn(rank, cols, generator=torch.Generator().manual_seed(2))  # P_U G = G
    outside = left_basis[:, rank:] @ torch.randn(rows - rank, cols - rank) @ right_basis[:, rank:].T
    outside = outside / outside.norm() * inside.norm()  # equal energy, orthogonal to `inside`
    grads_EMN = torch.stack([inside, outside, inside + outside, torch.zeros(rows, cols)])
    share_E = common_energy_share(grads_EMN, left_MK, right_NK)
    torch.testing.assert_close(share_E, torch.tensor([1.0, 0.0, 0.5, 0.0]), atol=1e-5, rtol=0)


def test_gate_alignment_measures_router_rows_against_the_dominant_hidden_directions() -> None:
    width = 16
    directions = _orthonormal(width, width, seed=0)
    generator = torch.Generator().manual_seed(1)
    # Hidden states: strong along directions 0 and 1, weak elsewhere.
    scales = torch.tensor([10.0, 5.0] + [0.1] * (width - 2))
    hidden_TD = (torch.randn(4000, width, generator=generator) * scales) @ directions.T
    top_DK = top_right_singular_vectors(hidden_TD, count=2)
    assert torch.allclose((top_DK.T @ directions[:, :2]).abs(), torch.eye(2), atol=0.02)
    router_ED = torch.stack([directions[:, 0] * 3, directions[:, 1], directions[:, 5]])
    cosines_EK = gate_alignment(router_ED, top_DK)
    torch.testing.assert_close(cosines_EK, torch.tensor([[1.0, 0], [0, 1], [0, 0]]), atol=0.02, rtol=0)
    share_E = top_direction_share(cosines_EK[:2])
    torch.testing.assert_close(share_E, torch.tensor([1.0, 0.0]), atol=0.01, rtol=0)


def test_load_health_of_uniform_one_hot_and_known_loads() -> None:
    counts_LE = torch.tensor([[5, 5, 5, 5], [20, 0, 0, 0], [3, 1, 0, 0]])
    health = load_health(counts_LE)
    entropy_known = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    torch.testing.assert_close(health.normalised_entropy_L, torch.tensor([1.0, 0.0, entropy_known]))
    torch.testing.assert_close(health.max_over_mean_L, torch.tensor([1.0, 4.0, 3.0]))
    torch.testing.assert_close(health.dead_fraction_L, torch.tensor([0.0, 0.75, 0.5]))
    population_std = torch.tensor([3.0, 1, 0, 0]).std(correction=0).item()
    torch.testing.assert_close(health.coefficient_of_variation_L, torch.tensor([0.0, math.sqrt(3), population_std]))
    torch.testing.assert_close(health.load_fraction_LE[2], torch.tensor([0.75, 0.25, 0.0, 0.0]))


def test_load_health_of_one_layer_matches_its_row_and_a_layer_without_tokens_is_all_dead() -> None:
    counts_LE = torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0]])
    rows, single = load_health(counts_LE).named(), load_health(counts_LE[0]).named()
    assert list(rows) == ["load_entropy", "load_cv", "max_mean_load", "dead_expert_fraction"]
    for name, values_L in rows.items():
        assert single[name].shape == ()
        torch.testing.assert_close(single[name], values_L[0], msg=name)
    assert [float(values_L[1]) for values_L in rows.values()] == [0.0, 0.0, 0.0, 1.0]


def test_lowrank_subspaces_match_the_full_svd_and_leave_the_global_rng_alone() -> None:
    generator = torch.Generator().manual_seed(5)
    # Decaying spectra, as trained weights have: the top-4 subspace is well separated.
    left_EMX = torch.linalg.qr(torch.randn(6, 40, 24, generator=generator)).Q
    right_ENX = torch.linalg.qr(torch.randn(6, 56, 24, generator=generator)).Q
    spectrum_X = 0.7 ** torch.arange(24.0)
    matrices_EMN = (left_EMX * spectrum_X) @ right_ENX.transpose(-2, -1)
    state = torch.random.get_rng_state()
    low_left, low_right = top_singular_subspaces(matrices_EMN, 4, method="lowrank")
    assert torch.equal(torch.random.get_rng_state(), state)
    full_left, full_right = top_singular_subspaces(matrices_EMN, 4, method="full")
    for low, full in ((low_left, full_left), (low_right, full_right)):
        projector_error = low @ low.transpose(-2, -1) - full @ full.transpose(-2, -1)
        assert projector_error.abs().max() < 1e-3


@pytest.mark.parametrize("method", ["lowrank", "full"])
def test_subspaces_of_each_expert_do_not_depend_on_the_experts_factorised_with_it(method: str) -> None:
    # Expert parallelism factorises each rank's slice of the experts; the gathered bases must be the ones the
    # whole stack gives (the lowrank sketch is one matrix shared by every expert, drawn from a fixed seed).
    matrices_EMN = torch.randn(8, 24, 40, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    whole = top_singular_subspaces(matrices_EMN, 3, method)
    halves = [top_singular_subspaces(half_LMN, 3, method) for half_LMN in matrices_EMN.chunk(2)]
    for side, whole_EXR in enumerate(whole):
        sliced_EXR = torch.cat([half[side] for half in halves])
        torch.testing.assert_close(
            sliced_EXR @ sliced_EXR.mT, whole_EXR @ whole_EXR.mT, atol=1e-10, rtol=0, msg=f"side {side}"
        )


def test_gram_matrices_of_row_blocks_add_up_to_the_stacked_rows_directions() -> None:
    rows_TD = torch.randn(60, 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    summed_DD = sum(row_gram(block_TD) for block_TD in rows_TD.chunk(3))
    torch.testing.assert_close(summed_DD, row_gram(rows_TD))
    from_blocks_DK = top_gram_eigenvectors(summed_DD, 4)
    stacked_DK = top_right_singular_vectors(rows_TD, 4)
    torch.testing.assert_close((from_blocks_DK * stacked_DK).sum(dim=0).abs(), torch.ones(4, dtype=torch.float64))
