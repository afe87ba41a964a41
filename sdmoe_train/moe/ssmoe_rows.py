"""Construction of the SSMoE spectral router U from expert weights (arXiv 2605.30992).

Section numbers (§N) refer to the design notes ``docs/design/ssmoe.md``.

For every expert i and matrix M in {gate, up, downᵀ} (each F×D): thin SVD ``M = A Σ Bᵀ``; the columns
``b_j`` of B are directions of the D-dim hidden space. Sign-canonicalise them against the router row
``r_i``, pick the k with the largest alignment ``⟨r_i, b_j⟩`` (not the k largest singular values), average
them with equal weight into ``ū_M`` (so ``‖ū_M‖ = 1/√k``), then ``u_i`` = mean of ``ū_M`` over the three
matrices. Everything runs in fp32 under no_grad, batched over the E experts of a layer (one batched SVD per
matrix type).

Unique-part variant (our extension, §5): with SD-MoE, the proxies ``W_c + W_u[i]`` of all experts share the
dominant common directions, so their U rows come out nearly identical. This variant takes the SVD of
the unique parts ``W_u[i]`` instead, drops singular values below ``unique_cutoff · σ_max`` (the k common
directions, where W_u is zero by construction), and aligns against ``(I − P_V) r_i``, the router row with
its component in the common hidden-space subspace removed (the right basis V_k for gate/up, the left
basis U_k for down, whose rows live in the hidden space). Matrix types SD-MoE does not decompose use the
plain bank and the raw router row.
"""

# Shape key: E experts, F expert width, D model width, R singular vectors per matrix, J = selected vectors,
# C common rank of SD-MoE.

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import Tensor

from sdmoe_train.moe.experts import MATRIX_TYPES, ExpertBank

SignMode = Literal["canonical", "reference"]
Variant = Literal["full", "unique"]


class RowSettings(Protocol):
    """The settings U is built from; :class:`~sdmoe_train.moe.ssmoe_router.SSMoEConfig` provides them."""

    k: int
    variant: Variant
    sign: SignMode
    unique_cutoff: float


@torch.no_grad()
def aligned_singular_mean(
    matrix_EFD: Tensor,
    router_rows_ED: Tensor,
    k: int,
    sign: SignMode = "canonical",
    cutoff: float | None = None,
) -> Tensor:
    """``ū`` of every expert: the mean of its k right singular vectors best aligned with its router row.

    Args:
        matrix_EFD: one matrix per expert whose right singular vectors live in the hidden space (gate, up,
            or the transposed down matrix).
        router_rows_ED: the row each expert's vectors are aligned with (``r_i``, or ``(I − P_V) r_i``).
        k: vectors to average; clamped to the number of candidates (rank, or kept singular values).
        sign: ``canonical`` flips every vector to non-negative alignment and ranks by ``|⟨r_i, b_j⟩|``;
            ``reference`` ranks raw vectors by the signed alignment.
        cutoff: if set, singular values below ``cutoff · σ_max`` of that expert are never selected.

    Returns:
        (E, D) fp32 means, each of norm ``1/√k_eff`` (the selected vectors are orthonormal).
    """
    _, singular_ER, right_adjoint_ERD = torch.linalg.svd(matrix_EFD.float(), full_matrices=False)
    alignment_ER = torch.einsum("erd,ed->er", right_adjoint_ERD, router_rows_ED.float())
    if sign == "canonical":
        flips_ER = torch.where(alignment_ER < 0, -1.0, 1.0)
        right_adjoint_ERD = right_adjoint_ERD * flips_ER.unsqueeze(-1)
        alignment_ER = alignment_ER * flips_ER
    count = min(k, alignment_ER.shape[-1])
    if cutoff is not None:
        kept_ER = singular_ER >= cutoff * singular_ER[:, :1]
        count = min(count, int(kept_ER.sum(dim=-1).min()))
        alignment_ER = alignment_ER.masked_fill(~kept_ER, float("-inf"))
    chosen_EJ = alignment_ER.topk(count, dim=-1).indices
    chosen_EJD = right_adjoint_ERD.gather(1, chosen_EJ.unsqueeze(-1).expand(-1, -1, right_adjoint_ERD.shape[-1]))
    return chosen_EJD.mean(dim=1)


def _hidden_space_matrices(experts: ExpertBank, variant: Variant) -> list[tuple[Tensor, Tensor | None]]:
    """(E, F, D) matrices whose right singular vectors are hidden-space directions, each with the common
    hidden-space basis (D, C) to remove from the router row (None: use the raw row)."""
    matrices: list[tuple[Tensor, Tensor | None]] = []
    for matrix in MATRIX_TYPES:
        unique_EMN = experts.unique_part(matrix) if variant == "unique" else None
        bases = experts.common_bases(matrix)
        if unique_EMN is None or bases is None:
            applied_EMN = experts.applied_weight(matrix)
            matrices.append((applied_EMN.transpose(-2, -1) if matrix == "down" else applied_EMN, None))
        elif matrix == "down":
            matrices.append((unique_EMN.transpose(-2, -1), bases[0]))
        else:
            matrices.append((unique_EMN, bases[1]))
    return matrices


@torch.no_grad()
def spectral_router_rows(experts: ExpertBank, router_weight_ED: Tensor, config: RowSettings) -> Tensor:
    """The spectral router U of one MoE layer (§2; unique variant §5).

    Args:
        experts: the layer's routed experts (plain or SD-MoE).
        router_weight_ED: the learned router rows R.
        config: SSMoE settings (k, variant, sign, unique_cutoff).

    Returns:
        (E, D) fp32 U, row i = mean over matrix types of ``ū_M`` of expert i.
    """
    rows_ED = router_weight_ED.detach().float()
    means = []
    for matrix_EFD, common_DC in _hidden_space_matrices(experts, config.variant):
        target_ED = rows_ED
        cutoff = None
        if common_DC is not None:
            common_DC = common_DC.float()
            target_ED = rows_ED - (rows_ED @ common_DC) @ common_DC.T
            cutoff = config.unique_cutoff
        means.append(aligned_singular_mean(matrix_EFD.detach(), target_ED, config.k, config.sign, cutoff))
    return torch.stack(means).mean(dim=0)
