"""Top-k routers for Qwen-style (softmax) and DeepSeek-style (sigmoid, group-limited, bias-balanced) MoE.

Implements softmax top-k routing (Qwen-MoE), sigmoid scoring with a selection-only correction bias and
node/group-limited top-k (DeepSeek-V3, arXiv 2412.19437 §2.1.2, eq. 12-16), and the aux-loss-free bias
update (arXiv 2408.15664). All router arithmetic runs in fp32 whatever the model dtype, because top-k
selection and the balancing statistics are sensitive to rounding.
"""

# Shape key: T local tokens, D model width, E experts, K experts per token, G expert groups.

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdmoe_train.moe.config import MoEConfig


@dataclass
class RoutingDecision:
    """What the router chose for each token."""

    expert_ids_TK: Tensor
    """Selected experts (int64)."""
    weights_TK: Tensor
    """Output weights of the selected experts (fp32)."""
    logits_TE: Tensor
    """Raw router logits (fp32), used by the z-loss."""
    probs_TE: Tensor
    """Scores normalised over experts (softmax, or sigmoid scores divided by their sum), used by the
    balancing losses; never includes the selection bias."""


class Router(nn.Module):
    """Learned linear gate with top-k selection.

    The ``selection_bias`` buffer shifts which experts are *selected* but never the output weights; it
    is trained by :meth:`update_bias` (sign of the load error), not by gradients, and is saved in
    checkpoints.
    """

    def __init__(self, hidden_dim: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, hidden_dim))
        self.register_buffer("selection_bias", torch.zeros(config.num_experts), persistent=True)

    def forward(self, x_TD: Tensor, routing_stats: bool = True) -> RoutingDecision:
        """Route tokens.

        Args:
            x_TD: hidden states of T tokens, any float dtype.
            routing_stats: whether the pass feeds the routing statistics; routers that record their own (SSMoE's
                spectral router) skip that work when False. The decision never depends on it.

        Returns:
            The routing decision, computed in fp32.
        """
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE, probs_TE = self._scores(logits_TE)
        return self._decide(logits_TE, scores_TE, probs_TE)

    def _scores(self, logits_TE: Tensor) -> tuple[Tensor, Tensor]:
        """(scores that select and weight experts, the same normalised over experts for the balancing losses)."""
        if self.config.score_fn == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            return scores_TE, scores_TE
        scores_TE = logits_TE.sigmoid()
        return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def _select(self, scores_TE: Tensor) -> Tensor:
        """Top-k experts (T, K) by score plus selection bias, inside the best groups when group-limited."""
        cfg = self.config
        selection_TE = scores_TE.detach() + self.selection_bias
        if cfg.n_group > 1:
            selection_TE = self._keep_best_groups(selection_TE)
        return selection_TE.topk(cfg.top_k, dim=-1).indices

    def _decide(self, logits_TE: Tensor, scores_TE: Tensor, probs_TE: Tensor) -> RoutingDecision:
        """Select experts by ``scores_TE`` and turn the selected scores into output weights."""
        cfg = self.config
        expert_ids_TK = self._select(scores_TE)
        weights_TK = scores_TE.gather(-1, expert_ids_TK)
        if cfg.norm_topk_prob:
            # The epsilon keeps an all-zero sigmoid row (saturated logits) finite.
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        return RoutingDecision(expert_ids_TK, weights_TK, logits_TE, probs_TE)

    def _keep_best_groups(self, selection_TE: Tensor) -> Tensor:
        """Mask out every expert outside the ``topk_group`` best-scoring groups of each token."""
        cfg = self.config
        num_tokens = selection_TE.shape[0]
        grouped_TGe = selection_TE.view(num_tokens, cfg.n_group, -1)
        if cfg.group_score_fn == "max":
            group_scores_TG = grouped_TGe.amax(dim=-1)
        else:
            group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        best_groups_TG = group_scores_TG.topk(cfg.topk_group, dim=-1).indices
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool).scatter_(1, best_groups_TG, True)
        masked_TGe = grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf"))
        return masked_TGe.view(num_tokens, -1)

    def diagnostics(self) -> dict[str, Tensor]:
        """Router-specific statistics for the routing monitor (metric name to 0-dim tensor); none here.

        Routers that do more than the learned gate (SSMoE's spectral router) report theirs.
        """
        return {}

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones.

        Args:
            tokens_per_expert_E: token copies routed to each expert since the last update, already
                summed over micro-batches and data-parallel ranks so that every rank applies the same step.
        """
        rate = self.config.bias_update_rate
        if rate == 0.0:
            return
        load_E = tokens_per_expert_E.float()
        self.selection_bias.add_(rate * torch.sign(load_E.mean() - load_E))
