"""AdamW with decay / no-decay parameter groups and warmup + cosine or warmup-stable-decay schedules.

WSD (warmup-stable-decay) follows MiniCPM (arXiv 2404.06395 §4): linear warmup, a long constant
phase, then a short decay to ``min_lr_ratio`` over the last ``decay_fraction`` of training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sdmoe_train.config_checks import require_non_negative, require_positive
from sdmoe_train.errors import ConfigError


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.1
    """Decoupled weight decay for matrices (not norms, biases or, by default, embeddings)."""
    decay_embeddings: bool = False
    """Also apply weight decay to the token embedding (and a tied output head)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment coefficients."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Shape after warmup: cosine to min_lr, warmup-stable-decay, or constant."""
    decay_fraction: float = 0.2
    """WSD only: share of all steps spent in the final linear decay."""

    def __post_init__(self) -> None:
        # AdamW's eps divides by sqrt(v) + eps: 0 gives NaN updates for parameters without gradient yet.
        require_positive("optim", lr=self.lr, eps=self.eps)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        require_non_negative("optim", weight_decay=self.weight_decay)
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)} must both lie in [0, 1)")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction={self.decay_fraction} must lie in (0, 1]")


def parameter_groups(model: nn.Module, config: OptimConfig, embedding_params: set[nn.Parameter]) -> list[dict]:
    """Split parameters into a weight-decay group (matrices) and a no-decay group.

    No decay for 1-D parameters (norm weights, biases) and, unless ``decay_embeddings``, for
    ``embedding_params``.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        skip = param.dim() < 2 or (param in embedding_params and not config.decay_embeddings)
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_multiplier(step: int, config: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` as a fraction of the peak."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(config.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / decay_steps)


def build_optimizer(
    model: nn.Module,
    config: OptimConfig,
    embedding_params: set[nn.Parameter],
    total_steps: int,
    regroup: Callable[[list[dict]], list[dict]] | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`parameter_groups` and its per-step LambdaLR schedule.

    ``regroup`` may split the groups further (expert parameters for DeepSpeed) before the optimizer exists.
    """
    if config.schedule != "constant" and total_steps <= config.warmup_steps:
        raise ConfigError(
            f"trainer.max_steps={total_steps} must exceed optim.warmup_steps={config.warmup_steps} "
            f"for optim.schedule={config.schedule}; set trainer.max_steps or use schedule=constant"
        )
    groups = parameter_groups(model, config, embedding_params)
    if regroup is not None:
        groups = regroup(groups)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, total_steps))
    return optimizer, scheduler
