"""Per-expert statistics under expert parallelism, gathered as small factors, never as weight matrices.

A monitor that looks at the experts (spectra, overlaps between experts) needs all E experts on one rank,
but under expert parallelism each rank holds E/P of them. :func:`expert_factors` lets each rank factorise
its own experts and all-gathers only the top-r singular triplets: ``E·r·(M + N + 1)`` values per matrix
type instead of ``E·M·N`` (r/M + r/N of it). Token counts per expert need no gathering: routing is
replicated and the counts of the global expert ids are summed over ranks (``strategy.reduce``).
"""

# Shape key: E experts, L experts on this rank, M matrix rows, N matrix columns, R kept singular triplets.

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import MATRIX_TYPES, MatrixType
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
        for matrix, weight_LMN in zip(MATRIX_TYPES, layer.experts.expert_weights(), strict=True):
            left_LMK, values_LK, right_adjoint_LKN = torch.linalg.svd(weight_LMN.float(), full_matrices=False)
            local = (values_LK[:, :rank], left_LMK[..., :rank], right_adjoint_LKN[:, :rank].mT)
            factors[layer_index, matrix] = ExpertFactors(*(_gather_experts(t, groups) for t in local))
    return factors


def _gather_experts(local_L: Tensor, groups: ExpertParallelGroups | None) -> Tensor:
    if groups is None or groups.ep_size == 1:
        return local_L
    pieces = [torch.empty_like(local_L) for _ in range(groups.ep_size)]
    dist.all_gather(pieces, local_L.contiguous(), group=groups.ep_group)
    return torch.cat(pieces)
