"""Total and active parameter counts of an architecture, computed on the meta device (no memory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.experts import ExpertBank


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    """Every parameter (tied embeddings counted once)."""
    active: int
    """Parameters a token passes through: routed banks count top_k / num_experts of their size."""
    embedding: int
    """Token embedding plus an untied output head."""

    @property
    def total_non_embedding(self) -> int:
        return self.total - self.embedding

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding

    def summary(self) -> str:
        billions = 1e9
        return (
            f"total {self.total / billions:.3f}B ({self.total_non_embedding / billions:.3f}B non-embedding), "
            f"active {self.active / billions:.3f}B ({self.active_non_embedding / billions:.3f}B non-embedding)"
        )


def count_parameters(config: TransformerConfig) -> ParameterCounts:
    """Count parameters of ``config`` without allocating weights."""
    with torch.device("meta"):
        model = Transformer(config)
    return count_model_parameters(model)


def count_model_parameters(model: Transformer) -> ParameterCounts:
    """Count the parameters of a built model (on any device, the meta device included)."""
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.modules() if isinstance(m, ExpertBank) for p in m.parameters())
    active_routed = 0 if config.moe is None else routed * config.moe.top_k // config.moe.num_experts
    embedding = model.embed.weight.numel() + (0 if config.tie_embeddings else model.lm_head.weight.numel())
    return ParameterCounts(total=total, active=total - routed + active_routed, embedding=embedding)
