"""Routed SwiGLU experts stored as stacked weight banks, plus a slow per-expert loop kept as reference.

Each matrix type is one parameter of shape (E, out, in), so the whole bank runs as three grouped GEMMs
over the expert-sorted token buffer produced by the dispatcher (``torch.nn.functional.grouped_mm``:
no host sync, one kernel per matrix). Where grouped GEMM has no kernel (fp64, unaligned widths, CUDA
other than bf16 on sm80+), the bank runs one GEMM per expert on contiguous slices instead.
"""

# Shape key: T tokens, D model width, E experts, K experts per token, F expert width, N token copies.

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdmoe_train.moe.mlp import swiglu

MatrixType = Literal["gate", "up", "down"]
"""The three matrices of a SwiGLU expert: gate and up (F x D), down (D x F)."""
MATRIX_TYPES: tuple[MatrixType, ...] = ("gate", "up", "down")

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _has_grouped_mm_kernel(x_ND: Tensor, weight_EOI: Tensor) -> bool:
    """Whether ``F.grouped_mm`` has a kernel for these operands.

    CPU: fp32/bf16/fp16 with every row 16-byte aligned (the kernel rejects other widths). CUDA:
    bf16 on sm80+ only (torch documents no other dtype).
    """
    if x_ND.device.type == "cpu":
        row_bytes = [dim * x_ND.element_size() for dim in (weight_EOI.shape[1], weight_EOI.shape[2])]
        return x_ND.dtype in _GROUPED_MM_DTYPES and all(size % 16 == 0 for size in row_bytes)
    if x_ND.device.type == "cuda":
        return x_ND.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_ND.device) >= (8, 0)
    return False


def _autocast_operands(x_ND: Tensor, weight_EOI: Tensor) -> tuple[Tensor, Tensor]:
    """Both operands in autocast's low-precision dtype when autocast is on, as autocast treats ``mm``.

    Autocast has no rule for grouped_mm: without this cast the expert GEMMs of a ``bf16-mixed`` run would
    see the fp32 output of the RMSNorm and the fp32 master weights, run in fp32 and, on CUDA, where the
    grouped kernel is bf16-only, fall back to the per-expert loop.
    """
    device_type = x_ND.device.type
    if not torch.is_autocast_enabled(device_type):
        return x_ND, weight_EOI
    dtype = torch.get_autocast_dtype(device_type)
    return x_ND.to(dtype), weight_EOI.to(dtype)


def _grouped_mm(x_ND: Tensor, weight_EOI: Tensor, offsets_E: Tensor) -> Tensor:
    out_NO = F.grouped_mm(x_ND, weight_EOI.transpose(-2, -1), offs=offsets_E)
    if out_NO.requires_grad:
        # The grouped_mm backward rejects zero-stride gradients such as those of ``out.sum()``.
        out_NO.register_hook(torch.Tensor.contiguous)
    return out_NO


_grouped_mm_outside_graph = torch.compiler.disable(_grouped_mm)


def grouped_linear(x_ND: Tensor, weight_EOI: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Apply expert e's matrix to its contiguous slice of rows, for all experts at once.

    Args:
        x_ND: rows grouped by expert, shape (N, in).
        weight_EOI: stacked expert matrices, shape (E, out, in).
        tokens_per_expert_E: rows per expert; sums to N.

    Returns:
        (N, out) outputs.
    """
    x_ND, weight_EOI = _autocast_operands(x_ND, weight_EOI)
    if _has_grouped_mm_kernel(x_ND, weight_EOI):
        offsets_E = tokens_per_expert_E.cumsum(0, dtype=torch.int32)
        if torch.compiler.is_compiling() and x_ND.dtype != torch.bfloat16:
            # torch's shape function for grouped_mm (used while tracing) accepts bf16 only, the kernel more.
            return _grouped_mm_outside_graph(x_ND, weight_EOI, offsets_E)
        return _grouped_mm(x_ND, weight_EOI, offsets_E)
    slices = x_ND.split(tokens_per_expert_E.tolist())
    return torch.cat([rows @ w.T for rows, w in zip(slices, weight_EOI.unbind(0), strict=True)])


class ExpertBank(nn.Module):
    """E routed SwiGLU experts as three stacked weight banks (E × out × in per matrix).

    Each matrix type runs as its own grouped GEMM. Gate and up are not concatenated into one (E, 2F, D)
    bank: that would save one (N, D) input-gradient GEMM but copy both banks every forward, and on CPU its
    wider weight-gradient GEMM is slower than the two halves (measurements: ``benchmarks/README.md``).

    What callers read of a bank goes through methods, so that they need not know how it is parameterised:
    :meth:`applied_weight` (the weights tokens see), :meth:`applied_weight_grad`, and for SD-MoE banks
    :meth:`unique_part` and :meth:`common_bases` (None here). Subclasses that reparameterise the experts
    (SD-MoE) override :meth:`expert_weights` and those methods.
    """

    def __init__(self, num_experts: int, hidden_dim: int, expert_hidden_dim: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        """Experts held by this bank (fewer than the layer's on an expert-parallel rank)."""
        self.total_experts = num_experts
        """Experts of the whole layer."""
        self.expert_offset = 0
        """Layer index of this bank's first expert (non-zero on expert-parallel ranks after the first)."""
        self.gate_proj = nn.Parameter(torch.empty(num_experts, expert_hidden_dim, hidden_dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, expert_hidden_dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, expert_hidden_dim))

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The (gate, up, down) banks actually applied to tokens."""
        return self.gate_proj, self.up_proj, self.down_proj

    def applied_weight(self, matrix: MatrixType) -> Tensor:
        """The (E, M, N) weights of one matrix type as applied to tokens."""
        return getattr(self, f"{matrix}_proj")

    def applied_weight_grad(self, matrix: MatrixType) -> Tensor | None:
        """The gradient of :meth:`applied_weight` as autograd left it (None before the first backward)."""
        return getattr(self, f"{matrix}_proj").grad

    def unique_part(self, matrix: MatrixType) -> Tensor | None:
        """The per-expert unique parts W_u (E, M, N) of a spectrally decoupled matrix type; None here."""
        return None

    def common_bases(self, matrix: MatrixType) -> tuple[Tensor, Tensor] | None:
        """(U_k (M, k), V_k (N, k)) of a spectrally decoupled matrix type's common subspace; None here."""
        return None

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor, weights_N: Tensor | None = None) -> Tensor:
        """Run every expert on its slice of the expert-sorted rows.

        Args:
            x_ND: token copies grouped by expert.
            tokens_per_expert_E: rows per expert.
            weights_N: routing weight of each row, or None for unweighted outputs. Scaling the F-wide
                hidden activation before ``down_proj`` equals scaling the D-wide output (linearity) and
                touches F/D as much memory, which matters because the (N, D) passes are bandwidth-bound.

        Returns:
            (N, D) expert outputs, row-aligned with ``x_ND``.
        """
        gate_EFD, up_EFD, down_EDF = self.expert_weights()
        gate_NF = grouped_linear(x_ND, gate_EFD, tokens_per_expert_E)
        hidden_NF = swiglu(gate_NF, grouped_linear(x_ND, up_EFD, tokens_per_expert_E))
        if weights_N is not None:
            hidden_NF = hidden_NF * weights_N.unsqueeze(-1).to(hidden_NF.dtype)
        return grouped_linear(hidden_NF, down_EDF, tokens_per_expert_E)

    def run_expert(self, expert: int, x_RD: Tensor) -> Tensor:
        """Apply one expert to R rows with plain matmuls (used by the reference loop)."""
        gate_EFD, up_EFD, down_EDF = self.expert_weights()
        hidden_RF = swiglu(x_RD @ gate_EFD[expert].T, x_RD @ up_EFD[expert].T)
        return hidden_RF @ down_EDF[expert].T


def reference_moe_forward(
    x_TD: Tensor,
    expert_ids_TK: Tensor,
    weights_TK: Tensor,
    experts: ExpertBank,
    capacity: int | None = None,
) -> Tensor:
    """Slow, obviously-correct routed-expert forward: one masked gather per expert.

    Kept as the ground truth for tests and as the "naive" baseline of ``benchmarks/moe_layer.py``.

    Args:
        x_TD: token hidden states.
        expert_ids_TK: selected experts.
        weights_TK: output weight of each selected expert.
        experts: the expert bank.
        capacity: keep only each expert's first ``capacity`` copies in token order (None: keep all).

    Returns:
        (T, D) weighted sum of the selected experts' outputs.
    """
    y_TD = torch.zeros_like(x_TD)
    for expert in range(experts.num_experts):
        token_index, slot = torch.nonzero(expert_ids_TK == expert, as_tuple=True)
        if capacity is not None:
            token_index, slot = token_index[:capacity], slot[:capacity]
        if token_index.numel() == 0:
            continue
        out_RD = experts.run_expert(expert, x_TD[token_index])
        weight_R1 = weights_TK[token_index, slot].unsqueeze(-1).to(x_TD.dtype)
        y_TD = y_TD.index_add(0, token_index, out_RD * weight_R1)
    return y_TD
