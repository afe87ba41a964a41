"""Per-expert statistics under expert parallelism, gathered as small factors, never as weight matrices.

A monitor that compares experts (spectra, overlaps between experts) needs all E experts on one rank, but
under expert parallelism each rank holds E/P of them. Each rank factorises its own experts and the group
exchanges only what the statistics need, on every rank alike (each function here is a collective over the
expert-parallel group when ``groups.ep_size > 1``, and no communication otherwise):

- :func:`expert_subspaces`: top-r left and right singular bases, all-gathered: ``E·r·(M + N)`` values per
  matrix stack instead of ``E·M·N``;
- :func:`gather_experts`: any per-expert tensor (a scalar per expert: E values);
- :func:`sum_over_experts`: a sum over experts, such as the (D, D) Gram matrix of the expert input
  matrices, all-reduced; :func:`expert_mean` the mean weight over experts ((M, N), one expert's size);
- :func:`expert_factors`: the top-r singular triplets, ``E·r·(M + N + 1)`` values per matrix type.

Token counts per expert need no gathering: routing is replicated, so each rank counts its own tokens over
the global expert ids, and the strategy sums them over all ranks like any metric.
"""

# Shape key: E experts, L experts on this rank, M matrix rows, N matrix columns, R kept singular triplets,
# X any further axes.

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.diagnostics import SVDMethod, top_singular_subspaces
from sdmoe_train.moe.experts import MATRIX_TYPES, MatrixType
from sdmoe_train.parallel.groups import ExpertParallelGroups


@dataclass
class ExpertFactors:
    """Top-r singular triplets of every expert of one matrix type of one MoE layer (fp32)."""

    singular_values_ER: Tensor
    """Largest r singular values of each expert's applied weight, descending."""
    left_EMR: Tensor
    """Their left singular vectors."""
    right_ENR: Tensor
    """Their right singular vectors."""

    def low_rank(self) -> Tensor:
        """The rank-r approximations ``U diag(S) Vᵀ`` (sign-free, unlike the vectors themselves)."""
        return (self.left_EMR * self.singular_values_ER.unsqueeze(1)) @ self.right_ENR.mT


@torch.no_grad()
def expert_factors(
    model: Transformer, rank: int, groups: ExpertParallelGroups | None = None
) -> dict[tuple[int, MatrixType], ExpertFactors]:
    """Top-``rank`` SVD factors of every routed expert (SD-MoE: of the proxy ``W_c + W_u[i]``), on every rank.

    Args:
        model: the (possibly expert-sharded) transformer.
        rank: r, singular triplets kept per expert.
        groups: the expert-parallel layout; None or ``ep_size`` 1 when every rank holds all experts.

    Returns:
        ``{(block index, matrix type): factors of all E experts}``; collective under expert parallelism
        (every rank of the expert-parallel group must call it).
    """
    factors = {}
    for layer_index, layer in model.moe_layers():
        for matrix in MATRIX_TYPES:
            weight_LMN = layer.experts.applied_weight(matrix)
            left_LMK, values_LK, right_adjoint_LKN = torch.linalg.svd(weight_LMN.float(), full_matrices=False)
            local = (values_LK[:, :rank], left_LMK[..., :rank], right_adjoint_LKN[:, :rank].mT)
            factors[layer_index, matrix] = ExpertFactors(*(gather_experts(t, groups) for t in local))
    return factors


def gather_experts(local_LX: Tensor, groups: ExpertParallelGroups | None) -> Tensor:
    """All experts' values, in global expert order, from every rank's values of its own experts.

    Args:
        local_LX: a tensor whose first axis runs over this rank's L experts.
        groups: the expert-parallel layout; None or ``ep_size`` 1 when every rank holds all experts.

    Returns:
        (E, ...) on every rank of the expert-parallel group.
    """
    if groups is None or groups.ep_size == 1:
        return local_LX
    pieces = [torch.empty_like(local_LX) for _ in range(groups.ep_size)]
    dist.all_gather(pieces, local_LX.contiguous(), group=groups.ep_group)
    return torch.cat(pieces)


def sum_over_experts(local_sum: Tensor, groups: ExpertParallelGroups | None) -> Tensor:
    """The sum over all experts of a quantity each rank has summed over its own experts (a new tensor)."""
    if groups is None or groups.ep_size == 1:
        return local_sum
    total = local_sum.clone()
    dist.all_reduce(total, group=groups.ep_group)
    return total


def expert_subspaces(
    matrices_LMN: Tensor, rank: int, method: SVDMethod, groups: ExpertParallelGroups | None
) -> tuple[Tensor, Tensor]:
    """Top-r left and right singular bases of every expert's matrix, factorised locally, gathered.

    Each expert's bases depend only on its own matrix (the ``lowrank`` sketch is the same for every expert),
    so they equal the bases a single process computes from all E matrices at once.

    Args:
        matrices_LMN: this rank's experts' matrices (weights or gradients).
        rank: r.
        method: see :func:`~sdmoe_train.moe.diagnostics.top_singular_subspaces`.
        groups: the expert-parallel layout, or None.

    Returns:
        (left_EMR, right_ENR) of all E experts, fp32 or wider.
    """
    left_LMR, right_LNR = top_singular_subspaces(matrices_LMN, rank, method)
    return gather_experts(left_LMR, groups), gather_experts(right_LNR, groups)


def expert_mean(matrices_LMN: Tensor, groups: ExpertParallelGroups | None) -> Tensor:
    """The (M, N) mean over all E experts of a per-expert matrix stack, summed in fp32 or wider."""
    matrices_LMN = matrices_LMN.detach()
    local_sum_MN = matrices_LMN.to(torch.promote_types(matrices_LMN.dtype, torch.float32)).sum(dim=0)
    num_experts = matrices_LMN.shape[0] * (1 if groups is None else groups.ep_size)
    return sum_over_experts(local_sum_MN, groups) / num_experts
