"""Linear algebra of SD-MoE (arXiv 2602.12556): spectral init, gradient split, strict updates, basis SVD.

Pure tensor functions over one matrix type of one MoE layer; :mod:`sdmoe_train.moe.sdmoe` wires them into
the expert bank and the training step. Section numbers refer to ``docs/design/sdmoe.md``, which restates
the paper's method. Every projection works with the thin bases only: with ``A = UᵀG``, ``B = GV`` and
``C = UᵀGV`` the part of G that touches the common subspace is ``P_U G + G P_V − P_U G P_V =
U·A + (B − U·C)·Vᵀ``, a rank-2k product written as one batched GEMM with inner width 2k, so the m×m and
n×n projectors are never formed and each (E, m, n) gradient is read twice and updated in place once.
"""

# Shape key: E experts, M matrix rows (out), N matrix columns (in), K common rank, R = min(M, N) − K tail,
# Q sketch width of the randomised SVD.

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SVDMethod = Literal["lowrank", "full"]
"""How :func:`top_singular_bases` factorises: randomised (``lowrank``) or exact (``full``)."""
_LOWRANK_OVERSAMPLING = 8
"""Extra sketch columns of the randomised SVD beyond k (Halko et al. 2009 recommend 5–10)."""
_LOWRANK_POWER_ITERATIONS = 2
"""Subspace iterations of the randomised SVD; sharpens the top-k subspace when the spectrum decays slowly."""


def _working(tensor: Tensor) -> Tensor:
    """The tensor in fp32, or as it is when already fp32/fp64: projections never lose precision."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@dataclass
class SpectralInit:
    """Initial SD-MoE state of one matrix type (§3)."""

    left_basis_MK: Tensor
    """U_k: top-k left singular vectors of the sampled W0."""
    right_basis_NK: Tensor
    """V_k: top-k right singular vectors of W0."""
    common_MN: Tensor
    """W_c = U_k Σ_k V_kᵀ (rank k)."""
    unique_EMN: Tensor
    """W_u[i] = Ũ_i Σ_tail Ṽ_iᵀ with Ũ_i ⊥ U_k and Ṽ_i ⊥ V_k."""


def spectral_init(weight_MN: Tensor, rank: int, num_experts: int, generator: torch.Generator) -> SpectralInit:
    """Split one sampled matrix W0 into a rank-k common part and E unique parts with W0's tail spectrum.

    §3, exactly (no cheaper approximation): every proxy ``W_c + W_u[i]`` has the singular values of
    W0, and each unique part lives in the orthogonal complement of the common bases on both sides.

    Args:
        weight_MN: the sampled W0 (fp32).
        rank: k, smaller than min(M, N).
        num_experts: E.
        generator: source of the random complement frames (on W0's device).

    Returns:
        The bases, the common part and the stacked unique parts.
    """
    left_MR, singular_R, right_adjoint_RN = torch.linalg.svd(weight_MN, full_matrices=False)
    left_MK, right_NK = left_MR[:, :rank], right_adjoint_RN[:rank].T
    common_MN = (left_MK * singular_R[:rank]) @ right_NK.T
    tail_R = singular_R[rank:]
    # Only the first R = min(M, N) − k columns of each complement frame meet a non-zero tail value in the
    # zero-padded (M−k)×(N−k) Σ_tail, so the frames are drawn that narrow.
    left_EMR = _complement_frames(left_MK, num_experts, tail_R.numel(), generator)
    right_ENR = _complement_frames(right_NK, num_experts, tail_R.numel(), generator)
    unique_EMN = (left_EMR * tail_R) @ right_ENR.transpose(-2, -1)
    return SpectralInit(left_MK.contiguous(), right_NK.contiguous(), common_MN, unique_EMN)


def _complement_frames(basis_MK: Tensor, num_experts: int, width: int, generator: torch.Generator) -> Tensor:
    """E random orthonormal (M, width) frames orthogonal to ``basis_MK``: Gaussian, project out, batched QR."""
    rows = basis_MK.shape[0]
    gaussian_EMW = torch.randn(
        num_experts, rows, width, generator=generator, device=basis_MK.device, dtype=basis_MK.dtype
    )
    frame_EMW = gaussian_EMW
    # A second project + QR pass: the first QR's R⁻¹ amplifies the residual overlap with the basis by
    # cond(R), large when width ≈ M − k; on an orthonormal frame cond(R) ≈ 1, leaving fp32 rounding only.
    for _ in range(2):
        frame_EMW = torch.linalg.qr(frame_EMW - basis_MK @ (basis_MK.T @ frame_EMW)).Q
    return frame_EMW


def _coefficients(matrix_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> tuple[Tensor, Tensor]:
    """(UᵀG (…, k, N), GV (…, M, k)), the only two passes that read G.

    GV is formed as (VᵀGᵀ)ᵀ: on CPU a GEMM with k output rows over G's transposed view runs faster than the
    (E·M, N) × (N, k) product with k output columns (measurements: ``benchmarks/README.md``).
    """
    left_coeffs_EKN = left_MK.T @ matrix_EMN
    right_coeffs_EMK = (right_NK.T @ matrix_EMN.transpose(-2, -1)).transpose(-2, -1)
    return left_coeffs_EKN, right_coeffs_EMK


def _touching_part_factors(matrix_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> tuple[Tensor, Tensor]:
    """Factors (X, Y), X (…, M, 2k), Y (…, 2k, N), with ``X @ Y = P_U G + G P_V − P_U G P_V``."""
    return _factors(*_coefficients(matrix_EMN, left_MK, right_NK), left_MK, right_NK)


def _factors(
    left_coeffs_EKN: Tensor, right_coeffs_EMK: Tensor, left_MK: Tensor, right_NK: Tensor
) -> tuple[Tensor, Tensor]:
    core_EKK = left_coeffs_EKN @ right_NK
    batch = left_coeffs_EKN.shape[:-2]
    outer_EM2K = torch.cat((left_MK.expand(*batch, -1, -1), right_coeffs_EMK - left_MK @ core_EKK), dim=-1)
    inner_E2KN = torch.cat((left_coeffs_EKN, right_NK.T.expand(*batch, -1, -1)), dim=-2)
    return outer_EM2K, inner_E2KN


def common_subspace_part(matrix_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> Tensor:
    """``P_U G + G P_V − P_U G P_V``: the part of each matrix that touches the common subspace, in >= fp32.

    ``G`` minus this is the unique-part projection of §4, so ``‖result‖² / ‖G‖²`` is the share of G's
    energy inside the common subspace (the gradient diagnostic of §8).

    Args:
        matrix_EMN: matrices (any leading batch shape), left unchanged.
        left_MK: U_k.
        right_NK: V_k.

    Returns:
        Tensor of ``matrix_EMN``'s shape.
    """
    work_EMN = _working(matrix_EMN)
    outer_EM2K, inner_E2KN = _touching_part_factors(work_EMN, left_MK.to(work_EMN.dtype), right_NK.to(work_EMN.dtype))
    return outer_EM2K @ inner_E2KN


@torch.no_grad()
def project_unique_gradient_(grad_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> None:
    """In place: ``G_u[i] = (I − P_U) G_i (I − P_V)`` for every expert (§4), in fp32 or wider.

    Args:
        grad_EMN: per-expert gradients of the unique parts; overwritten.
        left_MK: U_k.
        right_NK: V_k.
    """
    work_EMN = _working(grad_EMN)
    outer_EM2K, inner_E2KN = _touching_part_factors(work_EMN, left_MK.to(work_EMN.dtype), right_NK.to(work_EMN.dtype))
    work_EMN.baddbmm_(outer_EM2K, inner_E2KN, alpha=-1)
    if work_EMN is not grad_EMN:
        grad_EMN.copy_(work_EMN)


@torch.no_grad()
def project_common_gradient_(grad_MN: Tensor, left_MK: Tensor, right_NK: Tensor) -> None:
    """In place: ``G_c = P_U g + (I − P_U) g P_V`` of the expert-summed gradient g (§4), in fp32 or wider.

    Args:
        grad_MN: autograd's gradient of W_c, which is already Σ_i G_i; overwritten.
        left_MK: U_k.
        right_NK: V_k.
    """
    work_MN = _working(grad_MN)
    outer_M2K, inner_2KN = _touching_part_factors(work_MN, left_MK.to(work_MN.dtype), right_NK.to(work_MN.dtype))
    grad_MN.copy_(outer_M2K @ inner_2KN)


@torch.no_grad()
def fold_touching_parts_(common_MN: Tensor, unique_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> None:
    """In place: move the part of every W_u[i] that touches (U_k, V_k) out of it, adding their mean to W_c.

    With ``C_i = P_U W_u[i] + W_u[i] P_V − P_U W_u[i] P_V``: ``W_u[i] ← W_u[i] − C_i = (I − P_U) W_u[i] (I − P_V)``
    and ``W_c ← W_c + mean_i C_i``. The experts' mean proxy ``W_c + mean_i W_u[i]`` is unchanged; expert i's
    proxy moves by ``mean_j C_j − C_i``, which is small when what the unique parts hold inside the common
    subspace is mostly shared. ``mean_i C_i`` is the touching part of ``mean_i W_u[i]`` (the projection is
    linear), so W_c's share costs one (M, N) projection. Not part of the paper's method (its refresh leaves
    W_u as it is): the ``reproject_unique`` option of :class:`~sdmoe_train.moe.sdmoe.SDMoEConfig`.

    Args:
        common_MN: W_c; gains the mean touching part.
        unique_EMN: W_u; overwritten with its complement part, in fp32 or wider arithmetic.
        left_MK: U_k (the new bases).
        right_NK: V_k.
    """
    work_EMN = _working(unique_EMN)
    left_MK, right_NK = left_MK.to(work_EMN.dtype), right_NK.to(work_EMN.dtype)
    outer_M2K, inner_2KN = _touching_part_factors(work_EMN.mean(dim=0), left_MK, right_NK)
    common_MN.add_((outer_M2K @ inner_2KN).to(common_MN.dtype))
    outer_EM2K, inner_E2KN = _touching_part_factors(work_EMN, left_MK, right_NK)
    work_EMN.baddbmm_(outer_EM2K, inner_E2KN, alpha=-1)
    if work_EMN is not unique_EMN:
        unique_EMN.copy_(work_EMN)


@dataclass
class UpdateReference:
    """What strict mode keeps of the pre-step unique parts: their coordinates along the bases.

    ``E·k·(M + N)`` floats instead of a full ``E·M·N`` copy of W_u (k/M + k/N of it, 1/32 at k = 8,
    M = N = 512), enough to recover ``UᵀΔ`` and ``ΔV`` of the update Δ after the step.
    """

    left_coeffs_EKN: Tensor
    """U_kᵀ W_u before the step."""
    right_coeffs_EMK: Tensor
    """W_u V_k before the step."""


@torch.no_grad()
def update_reference(unique_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> UpdateReference:
    """Record the pre-step coordinates of W_u along U_k and V_k (fp32 or wider)."""
    unique_EMN = _working(unique_EMN)
    return UpdateReference(*_coefficients(unique_EMN, left_MK.to(unique_EMN.dtype), right_NK.to(unique_EMN.dtype)))


@torch.no_grad()
def project_unique_update_(unique_EMN: Tensor, reference: UpdateReference, left_MK: Tensor, right_NK: Tensor) -> None:
    """In place: replace the optimizer's update Δ of W_u by ``(I − P_U) Δ (I − P_V)`` (strict mode, §4).

    Args:
        unique_EMN: W_u after the optimizer step; overwritten with ``W_old + (I − P_U) Δ (I − P_V)``.
        reference: :func:`update_reference` of W_old under the same bases.
        left_MK: U_k used for this step.
        right_NK: V_k used for this step.
    """
    work_EMN = _working(unique_EMN)
    left_MK, right_NK = left_MK.to(work_EMN.dtype), right_NK.to(work_EMN.dtype)
    # UᵀΔ and ΔV by linearity from the stored UᵀW_old and W_old·V: no copy of W_old is needed.
    left_coeffs_EKN, right_coeffs_EMK = _coefficients(work_EMN, left_MK, right_NK)
    left_coeffs_EKN = left_coeffs_EKN - reference.left_coeffs_EKN
    right_coeffs_EMK = right_coeffs_EMK - reference.right_coeffs_EMK
    outer_EM2K, inner_E2KN = _factors(left_coeffs_EKN, right_coeffs_EMK, left_MK, right_NK)
    work_EMN.baddbmm_(outer_EM2K, inner_E2KN, alpha=-1)
    if work_EMN is not unique_EMN:
        unique_EMN.copy_(work_EMN)


@torch.no_grad()
def top_singular_bases(
    matrix_EMN: Tensor, rank: int, method: SVDMethod, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Orthonormal bases of the top-k left and right singular subspaces, batched over leading axes, in >= fp32.

    The one SVD routine behind SD-MoE's basis refresh (§5) and the specialisation
    diagnostics (§8).

    Args:
        matrix_EMN: a matrix or a stack of matrices (any leading batch shape), e.g. the common part W_c.
        rank: k, at most min(M, N).
        method: ``full`` runs one batched ``torch.linalg.svd``; ``lowrank`` a batched randomised SVD (Halko
            et al. 2009, alg. 4.4 + 5.1) with k + 8 sketch columns and 2 power iterations, which costs a few
            thin GEMMs instead of a full factorisation and is exact up to the subspace's spectral gap.
            ``torch.svd_lowrank`` draws its sketch from the global RNG, so the same algorithm is written
            here against ``generator``, and measuring never changes a run's random stream.
        generator: required for ``lowrank``; fixes the sketch (the same for every matrix of the stack).

    Returns:
        (left_EMK, right_ENK): U_k and V_k of every matrix.
    """
    work_EMN = _working(matrix_EMN.detach())
    if method == "full":
        left_EMR, _, right_adjoint_ERN = torch.linalg.svd(work_EMN, full_matrices=False)
        return left_EMR[..., :rank], right_adjoint_ERN[..., :rank, :].transpose(-2, -1)
    if generator is None:
        raise ValueError("the lowrank SVD needs a generator")
    rows, columns = work_EMN.shape[-2:]
    width = min(rank + _LOWRANK_OVERSAMPLING, rows, columns)
    sketch_NQ = torch.randn(columns, width, generator=generator, device=work_EMN.device, dtype=work_EMN.dtype)
    range_EMQ = torch.linalg.qr(work_EMN @ sketch_NQ).Q
    for _ in range(_LOWRANK_POWER_ITERATIONS):
        range_EMQ = torch.linalg.qr(work_EMN @ torch.linalg.qr(work_EMN.transpose(-2, -1) @ range_EMQ).Q).Q
    small_left_EQQ, _, right_adjoint_EQN = torch.linalg.svd(range_EMQ.transpose(-2, -1) @ work_EMN, full_matrices=False)
    return range_EMQ @ small_left_EQQ[..., :rank], right_adjoint_EQN[..., :rank, :].transpose(-2, -1)
