"""Expert-specialisation diagnostics of one MoE layer (``docs/design/sdmoe.md`` §8).

The SD-MoE paper (arXiv 2602.12556, §2) measures expert similarity and gradient alignment, but its formulas
are not public; the definitions here are ours:

- ``sim(A, B; r) = ‖Q_Aᵀ Q_B‖_F² / r`` with Q the top-r left (or right) singular vectors: the mean squared
  cosine of the principal angles between the two r-dimensional subspaces, 1 for the same subspace, 0 for
  orthogonal ones and about r/m for random subspaces of R^m;
- gradient energy in the common subspace: ``‖G − (I − P_U) G (I − P_V)‖² / ‖G‖²``;
- gate alignment: ``|cos(g_e, v_t)|`` of router rows against the top singular directions of a matrix whose
  rows span the layer's input space (hidden states, or the expert input matrices);
- routing health: normalised load entropy, coefficient of variation, max/mean load, dead-expert fraction.

Pure tensor functions, batched and in fp32 (or wider): the Lightning callbacks in
``sdmoe_train/lightning/callbacks/`` decide when they run and log the results. Nothing here reads a
tensor back to the host, so on an accelerator no call forces a synchronisation.
"""

# Shape key: E experts, M matrix rows (out), N matrix columns (in), R diagnostic rank, D model width,
# T rows of a sample matrix, K directions, L layers.

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sdmoe_train.moe.spectral import SVDMethod, common_subspace_part, top_singular_bases


def _fp32(tensor: Tensor) -> Tensor:
    return tensor.detach().to(torch.promote_types(tensor.dtype, torch.float32))


def top_singular_subspaces(
    matrices_EMN: Tensor, rank: int, method: SVDMethod = "full", seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of every matrix's top-r left and right singular subspaces, batched over the stack.

    :func:`~sdmoe_train.moe.spectral.top_singular_bases` with the ``lowrank`` sketch drawn from a generator
    seeded with ``seed`` (never the global RNG, so measuring does not change a run's random stream).

    Returns:
        (left_EMR, right_ENR) in fp32 or wider.
    """
    generator = torch.Generator(matrices_EMN.device).manual_seed(seed) if method == "lowrank" else None
    return top_singular_bases(matrices_EMN, rank, method, generator)


def subspace_similarity(bases_EMR: Tensor) -> Tensor:
    """``sim`` of every pair of subspaces: ``‖Q_iᵀ Q_j‖_F² / r``.

    Args:
        bases_EMR: E orthonormal (M, r) bases.

    Returns:
        (E, E) symmetric matrix in [0, 1] with ones on the diagonal.
    """
    rank = bases_EMR.shape[-1]
    products_EERR = torch.einsum("imr,jms->ijrs", bases_EMR, bases_EMR)
    return products_EERR.square().sum(dim=(-2, -1)) / rank


def off_diagonal_mean_max(similarity_EE: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and max over the pairs of distinct experts (0-dim tensors, no host sync)."""
    num_experts = similarity_EE.shape[0]
    assert num_experts >= 2, "similarity between experts needs at least two experts"
    off_diagonal_sum = similarity_EE.sum() - similarity_EE.diagonal().sum()
    diagonal_EE = torch.eye(num_experts, dtype=torch.bool, device=similarity_EE.device)
    return off_diagonal_sum / (num_experts * (num_experts - 1)), similarity_EE.masked_fill(diagonal_EE, -1.0).amax()


def common_energy_share(grads_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> Tensor:
    """Share of each matrix's squared Frobenius norm inside the common subspace (``U_k`` or ``V_k``).

    Args:
        grads_EMN: per-expert gradients.
        left_MK: U_k.
        right_NK: V_k.

    Returns:
        (E,) values in [0, 1]; 0 for an all-zero gradient (an expert that received no tokens).
    """
    grads_EMN = _fp32(grads_EMN)
    common_EMN = common_subspace_part(grads_EMN, left_MK, right_NK)
    total_E = grads_EMN.square().sum(dim=(-2, -1))
    return common_EMN.square().sum(dim=(-2, -1)) / total_E.clamp_min(torch.finfo(total_E.dtype).tiny)


def row_gram(rows_TD: Tensor) -> Tensor:
    """The (D, D) Gram matrix ``AᵀA`` of a (T, D) matrix, in fp32 or wider.

    Gram matrices of row blocks add up: the Gram of stacked blocks is the sum of theirs, which is how the
    expert-parallel ranks combine their experts' rows without exchanging them.
    """
    rows_TD = _fp32(rows_TD)
    return rows_TD.T @ rows_TD


def top_gram_eigenvectors(gram_DD: Tensor, count: int) -> Tensor:
    """The top-K eigenvectors of a Gram matrix ``AᵀA``: the top-K right singular vectors of A.

    Returns:
        (D, K) orthonormal columns, strongest direction first (each up to sign).
    """
    _, eigenvectors_DD = torch.linalg.eigh(gram_DD)
    return eigenvectors_DD[:, -count:].flip(-1)


def top_right_singular_vectors(rows_TD: Tensor, count: int) -> Tensor:
    """The top-K right singular vectors of a (T, D) matrix, from the eigenvectors of its (D, D) Gram matrix.

    The Gram route costs T·D² + D³ instead of a full SVD's T·D·min(T, D) and does not depend on T beyond the
    product; squaring the spectrum only matters for directions near the noise floor, not the top ones.

    Returns:
        (D, K) orthonormal columns, strongest direction first.
    """
    return top_gram_eigenvectors(row_gram(rows_TD), count)


def gate_alignment(router_ED: Tensor, directions_DK: Tensor) -> Tensor:
    """``|cos(g_e, v_t)|`` of every router row against every direction.

    Args:
        router_ED: router weight rows g_e.
        directions_DK: orthonormal directions v_t, strongest first.

    Returns:
        (E, K) absolute cosines.
    """
    return (F.normalize(_fp32(router_ED), dim=-1) @ _fp32(directions_DK)).abs()


def top_direction_share(cosines_EK: Tensor) -> Tensor:
    """Per router row, the share of ``Σ_t cos²`` captured by the strongest direction t = 1 (E,)."""
    squares_EK = cosines_EK.square()
    return squares_EK[:, 0] / squares_EK.sum(dim=-1).clamp_min(torch.finfo(squares_EK.dtype).tiny)


@dataclass
class LoadHealth:
    """Balance statistics of the expert loads of L layers (or of one layer: every field without its L axis)."""

    load_fraction_LE: Tensor
    """Share of the selected token copies that went to each expert."""
    normalised_entropy_L: Tensor
    """Load entropy / log E: 1 for uniform loads, 0 when one expert takes everything."""
    coefficient_of_variation_L: Tensor
    """Standard deviation / mean of the loads (population std): 0 when uniform."""
    max_over_mean_L: Tensor
    """Largest load / mean load: 1 when uniform, E when one expert takes everything."""
    dead_fraction_L: Tensor
    """Share of experts that received no token."""

    def named(self) -> dict[str, Tensor]:
        """The per-layer statistics under their metric names."""
        return {
            "load_entropy": self.normalised_entropy_L,
            "load_cv": self.coefficient_of_variation_L,
            "max_mean_load": self.max_over_mean_L,
            "dead_expert_fraction": self.dead_fraction_L,
        }


def load_health(tokens_per_expert_LE: Tensor) -> LoadHealth:
    """Balance statistics of token counts per expert.

    Args:
        tokens_per_expert_LE: token copies per expert, of L layers (L, E) or of one layer (E,), any numeric
            dtype. A layer without any token gets fractions, entropy, variation and max/mean of 0.

    Returns:
        The statistics in fp32 (or wider).
    """
    counts_LE = tokens_per_expert_LE.to(torch.promote_types(tokens_per_expert_LE.dtype, torch.float32))
    tiny = torch.finfo(counts_LE.dtype).tiny
    num_experts = counts_LE.shape[-1]
    mean_L = counts_LE.mean(dim=-1).clamp_min(tiny)
    fraction_LE = counts_LE / counts_LE.sum(dim=-1, keepdim=True).clamp_min(tiny)
    entropy_L = -torch.special.xlogy(fraction_LE, fraction_LE).sum(dim=-1)
    return LoadHealth(
        load_fraction_LE=fraction_LE,
        normalised_entropy_L=entropy_L / math.log(num_experts),
        coefficient_of_variation_L=counts_LE.std(dim=-1, correction=0) / mean_L,
        max_over_mean_L=counts_LE.amax(dim=-1) / mean_L,
        dead_fraction_L=(counts_LE == 0).to(counts_LE.dtype).mean(dim=-1),
    )
