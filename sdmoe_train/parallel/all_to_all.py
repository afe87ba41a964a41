"""All-to-all token dispatch for expert parallelism (a :class:`~sdmoe_train.moe.dispatch.Dispatcher`).

Each rank of an expert-parallel group of P ranks holds L = E/P consecutive experts. Dispatch first does
what :class:`~sdmoe_train.moe.dispatch.LocalDispatcher` does on the local tokens (stable sort by global
expert id, capacity dropping), which also groups the rows by destination rank; one small all-to-all
exchanges the per-expert counts, then ``all_to_all_single`` with uneven splits moves the rows and their
routing weights, and a stable sort puts the received rows in local-expert order. Combine runs the same
moves backwards. Both exchanges are differentiable (the backward of an all-to-all is the all-to-all with
the splits swapped), so gradients reach the router and the tokens' ranks.
"""

# Shape key: T local tokens, D model width, E experts, K experts per token, N token copies sent by this
# rank, R rows received by this rank, P ranks of the expert-parallel group, L experts per rank.

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sdmoe_train.moe.dispatch import ExpertBatch, LocalDispatcher


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; its backward sends gradients the other way."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup
    ) -> Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), input_splits, output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all of rows: send ``input_splits[j]`` rows to rank j, receive ``output_splits[j]``."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


@dataclass
class _Exchange:
    sent: ExpertBatch
    """The local dispatch of this rank's copies, rows grouped by global expert."""
    local_order_R: Tensor
    """Received row index of each expert-ordered row."""
    input_splits: list[int]
    output_splits: list[int]


class AllToAllDispatcher:
    """Dispatch to experts spread over an expert-parallel group.

    Args:
        num_experts: E, all experts of the layer (the router's output width).
        ep_size: P, ranks sharing the experts; E must be a multiple.
        group: the expert-parallel process group.
        capacity_factor: as for :class:`LocalDispatcher`, applied to this rank's copies before they are sent,
            so the same copies are dropped as in a data-parallel run on the same local batch.
    """

    def __init__(
        self, num_experts: int, ep_size: int, group: dist.ProcessGroup, capacity_factor: float | None = None
    ) -> None:
        assert num_experts % ep_size == 0, f"ep_size={ep_size} does not divide num_experts={num_experts}"
        self.local = LocalDispatcher(num_experts, capacity_factor)
        self.ep_size = ep_size
        self.experts_per_rank = num_experts // ep_size
        self.group = group

    def dispatch(self, x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor) -> ExpertBatch:
        sent = self.local.dispatch(x_TD, expert_ids_TK, weights_TK)
        send_counts_PL = sent.tokens_per_expert_E.view(self.ep_size, self.experts_per_rank)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        dist.all_to_all_single(recv_counts_PL, send_counts_PL, group=self.group)
        # The one host sync of the exchange: all_to_all_single takes its splits as Python lists.
        input_splits, output_splits = torch.stack((send_counts_PL.sum(1), recv_counts_PL.sum(1))).tolist()
        x_RD = all_to_all(sent.x_ND, output_splits, input_splits, self.group)
        weights_R = all_to_all(sent.weights_N, output_splits, input_splits, self.group)
        # Rows arrive grouped by (source rank, local expert); the expert bank needs them by local expert.
        local_expert_R = torch.arange(self.experts_per_rank, device=x_RD.device).repeat(self.ep_size)
        local_expert_R = local_expert_R.repeat_interleave(recv_counts_PL.flatten())
        local_order_R = torch.sort(local_expert_R, stable=True).indices
        return ExpertBatch(
            x_ND=x_RD.index_select(0, local_order_R),
            tokens_per_expert_E=recv_counts_PL.sum(0),
            weights_N=weights_R[local_order_R],
            route_back=_Exchange(sent, local_order_R, input_splits, output_splits),
        )

    def combine(self, y_ND: Tensor, batch: ExpertBatch) -> Tensor:
        exchange: _Exchange = batch.route_back
        y_RD = torch.zeros_like(y_ND).index_copy(0, exchange.local_order_R, y_ND)
        y_sent_ND = all_to_all(y_RD, exchange.input_splits, exchange.output_splits, self.group)
        return self.local.combine(y_sent_ND, exchange.sent)
