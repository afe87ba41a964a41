"""MoE feed-forward layer: router + dispatcher + routed expert bank + optional shared experts."""

# Shape key: B sequences, S tokens per sequence, T = B·S tokens, D model width, E experts, K experts per token.

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from sdmoe_train.moe.config import MoEConfig
from sdmoe_train.moe.dispatch import Dispatcher, LocalDispatcher, bin_counts, expert_capacity
from sdmoe_train.moe.experts import ExpertBank
from sdmoe_train.moe.losses import load_balance_loss, router_z_loss, sequence_balance_loss
from sdmoe_train.moe.mlp import SwiGLU
from sdmoe_train.moe.router import Router, RoutingDecision


@dataclass
class MoELayerStats:
    """Routing statistics and balancing losses of one forward pass of one MoE layer."""

    weighted_loss: Tensor
    """Coefficient-weighted sum of the enabled balancing losses; carries gradient, add it to the loss."""
    load_balance_loss: Tensor
    """Micro-batch balance loss value (detached; logged even when its coefficient is 0)."""
    sequence_balance_loss: Tensor
    """Sequence-level balance loss value (detached)."""
    z_loss: Tensor
    """Router z-loss value (detached)."""
    tokens_per_expert_E: Tensor
    """Token copies the router selected for each expert (before capacity dropping)."""
    dropped_fraction: Tensor
    """Share of token copies dropped by the capacity limit (0 when dropless)."""


class MoELayer(nn.Module):
    """Routed experts plus always-on shared experts, replacing the dense MLP of a block.

    The ``dispatcher`` attribute is the only thing expert parallelism replaces.
    """

    def __init__(self, hidden_dim: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(hidden_dim, config)
        self.experts = ExpertBank(config.num_experts, hidden_dim, config.expert_hidden_dim)
        self.dispatcher: Dispatcher = LocalDispatcher(config.num_experts, config.capacity_factor)
        self.shared_experts = SwiGLU(hidden_dim, config.shared_hidden_dim) if config.num_shared_experts else None
        self.shared_expert_gate = nn.Linear(hidden_dim, 1, bias=False) if config.shared_expert_gate else None

    def forward(self, x_BSD: Tensor, routing_stats: bool = True) -> tuple[Tensor, MoELayerStats | None]:
        """Mix each token's top-k routed experts and the shared experts.

        Args:
            x_BSD: normalised hidden states.
            routing_stats: compute the balancing losses and routing statistics (training, validation and
                monitors need them); False skips that work for inference, leaving the output unchanged.

        Returns:
            The (B, S, D) layer output and this pass's routing statistics (None without ``routing_stats``).
        """
        num_sequences, seq_len, hidden_dim = x_BSD.shape
        x_TD = x_BSD.reshape(-1, hidden_dim)
        routing = self.router(x_TD, routing_stats)
        batch = self.dispatcher.dispatch(x_TD, routing.expert_ids_TK, routing.weights_TK)
        expert_out_ND = self.experts(batch.x_ND, batch.tokens_per_expert_E, batch.weights_N)
        y_TD = self.dispatcher.combine(expert_out_ND, batch)
        if self.shared_experts is not None:
            y_TD = y_TD + self._shared_output(x_TD)
        stats = self._stats(routing, num_sequences) if routing_stats else None
        return y_TD.view(num_sequences, seq_len, hidden_dim), stats

    def _shared_output(self, x_TD: Tensor) -> Tensor:
        shared_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return shared_TD

    def _stats(self, routing: RoutingDecision, num_sequences: int) -> MoELayerStats:
        cfg = self.config
        balance = load_balance_loss(routing.probs_TE, routing.expert_ids_TK)
        seq_balance = sequence_balance_loss(routing.probs_TE, routing.expert_ids_TK, num_sequences)
        z_loss = router_z_loss(routing.logits_TE)
        weighted = balance.new_zeros(())
        for coef, loss in (
            (cfg.aux_loss_coef, balance),
            (cfg.seq_aux_loss_coef, seq_balance),
            (cfg.z_loss_coef, z_loss),
        ):
            if coef > 0:
                weighted = weighted + coef * loss
        num_tokens, top_k = routing.expert_ids_TK.shape
        tokens_per_expert_E = bin_counts(routing.expert_ids_TK, cfg.num_experts)
        capacity = expert_capacity(num_tokens, top_k, cfg.num_experts, cfg.capacity_factor)
        if capacity is None:
            dropped = balance.new_zeros(())
        else:
            dropped = (tokens_per_expert_E - tokens_per_expert_E.clamp(max=capacity)).sum() / (num_tokens * top_k)
        return MoELayerStats(
            weighted_loss=weighted,
            load_balance_loss=balance.detach(),
            sequence_balance_loss=seq_balance.detach(),
            z_loss=z_loss.detach(),
            tokens_per_expert_E=tokens_per_expert_E,
            dropped_fraction=dropped.float(),
        )


class InitScale(Protocol):
    """The initialisation settings of a model that reparameterisations (SD-MoE) must reproduce."""

    init_std: float
    n_layers: int


class MoEModel(Protocol):
    """What the model-wide functions of ``moe/`` (SD-MoE, SSMoE) need of a model, without importing ``models/``."""

    @property
    def config(self) -> InitScale: ...

    def moe_layers(self) -> Iterator[tuple[int, MoELayer]]:
        """(block index, layer) for every MoE feed-forward, in depth order."""
        ...
