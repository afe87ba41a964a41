"""Typed configuration of the parallel layout and execution: expert-parallel size, activation checkpointing, compile."""

from __future__ import annotations

from dataclasses import dataclass

from sdmoe_train.config_checks import divisors
from sdmoe_train.errors import ConfigError


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split over processes beyond plain data parallelism."""

    ep_size: int = 1
    """Expert-parallel group size: each MoE layer's routed experts are split evenly over this many ranks."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass instead of keeping its activations."""
    compile: bool = False
    """Compile each decoder block with torch.compile (docs/performance.md; not yet measured on a GPU)."""

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ConfigError(f"parallel.ep_size={self.ep_size} must be >= 1 (1 keeps every expert on every rank)")

    def check_num_experts(self, num_experts: int | None) -> None:
        """Raise ConfigError unless ``ep_size`` splits the routed experts evenly (known from the recipe)."""
        if self.ep_size == 1:
            return
        if num_experts is None:
            raise ConfigError(f"parallel.ep_size={self.ep_size} needs an MoE model, but arch.moe is null")
        if num_experts % self.ep_size:
            raise ConfigError(
                f"parallel.ep_size={self.ep_size} must divide moe.num_experts={num_experts} "
                f"(valid: {divisors(num_experts)})"
            )

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError unless ``ep_size`` divides the number of processes (known once launched)."""
        if world_size % self.ep_size:
            raise ConfigError(
                f"parallel.ep_size={self.ep_size} must divide the world size {world_size} "
                f"(trainer.devices x trainer.num_nodes; valid: {divisors(world_size)})"
            )
