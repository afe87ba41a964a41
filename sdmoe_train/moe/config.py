"""Typed configuration of the MoE feed-forward layers: routed and shared experts, routing and balancing.

Every check lives in ``__post_init__`` so that a bad recipe fails while it is parsed, before any weights
are allocated. The SD-MoE and SSMoE configurations live beside their code (``sdmoe.py``,
``ssmoe_router.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sdmoe_train.config_checks import divisors, require_non_negative, require_positive
from sdmoe_train.errors import ConfigError


@dataclass(kw_only=True)
class MoEConfig:
    """Routed + shared experts of the MoE feed-forward layers and their load balancing."""

    num_experts: int = 8
    """Routed experts in each MoE layer."""
    top_k: int = 2
    """Routed experts chosen for each token."""
    expert_hidden_dim: int = 256
    """Intermediate width of one routed SwiGLU expert."""
    num_shared_experts: int = 0
    """Always-on shared experts, fused into one SwiGLU of width num_shared_experts * shared_expert_hidden_dim."""
    shared_expert_hidden_dim: int | None = None
    """Intermediate width of one shared expert; None means expert_hidden_dim."""
    shared_expert_gate: bool = False
    """Scale the shared-expert output by sigmoid(w·x) per token (Qwen-MoE)."""
    score_fn: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over experts (Qwen) or independent sigmoids (DeepSeek-V3)."""
    norm_topk_prob: bool = False
    """Renormalise the selected top-k scores to sum to one."""
    routed_scaling_factor: float = 1.0
    """Multiplier on the routed output weights (DeepSeek)."""
    n_group: int = 1
    """Expert groups for group-limited routing; 1 disables it."""
    topk_group: int = 1
    """Groups a token may select experts from when n_group > 1."""
    group_score_fn: Literal["max", "top2_sum"] = "top2_sum"
    """How a group is scored for group-limited routing: best expert (DeepSeek-V2) or top-2 sum (V3)."""
    first_k_dense: int = 0
    """The first layers use a dense SwiGLU instead of MoE (DeepSeek's first_k_dense_replace)."""
    capacity_factor: float | None = None
    """None routes every token copy (dropless); otherwise each expert keeps at most
    ceil(capacity_factor * tokens * top_k / num_experts) copies and drops the rest."""
    aux_loss_coef: float = 0.0
    """Weight of the micro-batch (Switch-style) load-balancing loss."""
    seq_aux_loss_coef: float = 0.0
    """Weight of the sequence-level balancing loss (DeepSeek-V3 eq. 17-20)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (ST-MoE): mean squared log-sum-exp of router logits."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing: step size of the selection-bias update after each optimizer step; 0 disables."""

    def __post_init__(self) -> None:
        require_positive("moe", num_experts=self.num_experts, expert_hidden_dim=self.expert_hidden_dim)
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k={self.top_k} must lie in [1, moe.num_experts={self.num_experts}]")
        if self.num_shared_experts < 0:
            raise ConfigError(f"moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        if self.shared_expert_hidden_dim is not None:
            require_positive("moe", shared_expert_hidden_dim=self.shared_expert_hidden_dim)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ConfigError("moe.shared_expert_gate=true needs moe.num_shared_experts >= 1")
        require_positive("moe", routed_scaling_factor=self.routed_scaling_factor, n_group=self.n_group)
        if self.num_experts % self.n_group:
            raise ConfigError(
                f"moe.n_group={self.n_group} must divide moe.num_experts={self.num_experts} "
                f"(valid: {divisors(self.num_experts)})"
            )
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError(f"moe.topk_group={self.topk_group} must lie in [1, moe.n_group={self.n_group}]")
        experts_reachable = self.topk_group * (self.num_experts // self.n_group)
        if self.top_k > experts_reachable:
            raise ConfigError(
                f"moe.top_k={self.top_k} exceeds the {experts_reachable} experts inside "
                f"moe.topk_group={self.topk_group} groups; raise topk_group or lower top_k"
            )
        if self.n_group > 1 and self.group_score_fn == "top2_sum" and self.num_experts // self.n_group < 2:
            raise ConfigError("moe.group_score_fn=top2_sum needs at least 2 experts per group; use group_score_fn=max")
        if self.first_k_dense < 0:
            raise ConfigError(f"moe.first_k_dense={self.first_k_dense} must be >= 0")
        if self.capacity_factor is not None:
            require_positive("moe", capacity_factor=self.capacity_factor)
        require_non_negative(
            "moe",
            aux_loss_coef=self.aux_loss_coef,
            seq_aux_loss_coef=self.seq_aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
            bias_update_rate=self.bias_update_rate,
        )

    @property
    def shared_hidden_dim(self) -> int:
        """Width of the fused shared-expert SwiGLU (0 when there is none)."""
        per_expert = self.shared_expert_hidden_dim or self.expert_hidden_dim
        return self.num_shared_experts * per_expert
