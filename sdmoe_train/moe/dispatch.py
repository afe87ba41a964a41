"""Token dispatch: group token copies by expert and scatter expert outputs back.

The MoE layer talks to a :class:`Dispatcher` only, so expert parallelism can swap in an all-to-all
implementation (``sdmoe_train.parallel``) without touching model code. :class:`LocalDispatcher` is the
single-device path: a stable sort of the T·K token copies by expert id, a gather into one contiguous
buffer (each expert's tokens form one slice), and an ``index_add_`` back. It never builds a
dense token × expert one-hot. Routing weights travel with the rows and are applied by the experts
inside their narrow hidden layer (F wide, not D), which saves two full passes over the (N, D) buffer.
"""

# Shape key: T local tokens, D model width, E experts, K experts per token, N token copies sent to experts.

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


def bin_counts(ids: Tensor, num_bins: int) -> Tensor:
    """How often each of ``num_bins`` ids occurs in ``ids`` (int64, shape (num_bins,)).

    ``torch.bincount`` with ``minlength`` computes the same, but its output length depends on the data,
    which makes ``torch.compile`` break the graph at every call; this shape is fixed.
    """
    flat = ids.flatten()
    return torch.zeros(num_bins, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Copies each expert may keep: ``ceil(capacity_factor · T · K / E)``, or None when dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


@dataclass
class ExpertBatch:
    """Token copies laid out for the experts: each expert's rows form one contiguous slice."""

    x_ND: Tensor
    """Hidden states of the token copies, grouped by expert in expert order."""
    tokens_per_expert_E: Tensor
    """Rows of ``x_ND`` belonging to each expert (int64, on the tokens' device)."""
    weights_N: Tensor
    """Routing weight of each row (fp32); the experts apply it (see ``ExpertBank.forward``)."""
    route_back: Any
    """Dispatcher-private record of where each row came from, consumed by ``combine``."""


class Dispatcher(Protocol):
    """Moves token copies to the experts and their outputs back to the tokens."""

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> ExpertBatch:
        """Gather the copies each expert must process."""
        ...

    def combine(self, y_ND: Tensor, batch: ExpertBatch) -> Tensor:
        """Sum each token's (already weighted) expert outputs back into a (T, D) tensor."""
        ...


@dataclass
class _Placement:
    token_index_N: Tensor
    num_tokens: int


class LocalDispatcher:
    """Sort-based dispatch to experts living on this device.

    Args:
        num_experts: E.
        capacity_factor: None for dropless routing; otherwise each expert keeps its first
            ``ceil(capacity_factor · T · K / E)`` copies in token order and drops the rest
            (a dropped copy contributes nothing; the token's residual stream carries it on).
    """

    def __init__(self, num_experts: int, capacity_factor: float | None = None) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> ExpertBatch:
        num_tokens, top_k = expert_ids_TK.shape
        flat_ids = expert_ids_TK.flatten()
        # A stable sort keeps token order inside each expert, which fixes who is dropped at capacity.
        sorted_ids_N, copy_order_N = torch.sort(flat_ids, stable=True)
        tokens_per_expert_E = bin_counts(flat_ids, self.num_experts)
        capacity = expert_capacity(num_tokens, top_k, self.num_experts, self.capacity_factor)
        if capacity is not None:
            expert_start_E = tokens_per_expert_E.cumsum(0) - tokens_per_expert_E
            rank_in_expert_N = torch.arange(flat_ids.numel(), device=flat_ids.device) - expert_start_E[sorted_ids_N]
            copy_order_N = copy_order_N[rank_in_expert_N < capacity]
            tokens_per_expert_E = tokens_per_expert_E.clamp(max=capacity)
        token_index_N = copy_order_N.div(top_k, rounding_mode="floor")
        return ExpertBatch(
            x_ND=x_TD.index_select(0, token_index_N),
            tokens_per_expert_E=tokens_per_expert_E,
            weights_N=weights_TK.flatten()[copy_order_N],
            route_back=_Placement(token_index_N, num_tokens),
        )

    def combine(self, y_ND: Tensor, batch: ExpertBatch) -> Tensor:
        placement: _Placement = batch.route_back
        y_TD = y_ND.new_zeros(placement.num_tokens, y_ND.shape[-1])
        return y_TD.index_add_(0, placement.token_index_N, y_ND)
