"""Glue between :class:`~sdmoe_train.lightning.module.PretrainModule` and the expert-parallel machinery.

Kept here so that the Lightning module needs no ``torch.distributed`` import of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch import Tensor, nn

from sdmoe_train.errors import ConfigError
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.parallel.config import ParallelConfig
from sdmoe_train.parallel.expert_parallel import (
    apply_expert_parallel,
    expert_sharded_names,
    shard_expert_state,
    split_expert_param_groups,
)
from sdmoe_train.parallel.groups import ExpertParallelGroups, build_expert_parallel_groups


def uses_deepspeed(trainer: Any) -> bool:
    """Whether the trainer's strategy is (a subclass of) Lightning's DeepSpeedStrategy."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(getattr(trainer, "strategy", None), DeepSpeedStrategy)


def enable_expert_parallel(model: Transformer, config: ParallelConfig, trainer: Any) -> ExpertParallelGroups:
    """Check the layout against the launched processes, build the groups and shard the experts.

    Raises:
        ConfigError: ``ep_size`` does not divide the world size, or the strategy cannot reduce expert
            gradients per expert group (plain DDP would average different experts' slices together).
    """
    config.check_world_size(trainer.world_size)
    if not getattr(trainer.strategy, "supports_expert_parallel", False):
        raise ConfigError(
            f"model.parallel.ep_size={config.ep_size} needs trainer.strategy="
            f"sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy (ZeRO stage 0-2), not "
            f"{type(trainer.strategy).__name__}; see recipes/tiny_qwen_cpu_expert_parallel.yaml"
        )
    groups = build_expert_parallel_groups(config.ep_size)
    apply_expert_parallel(model, groups)
    return groups


def expert_param_groups(groups: ExpertParallelGroups) -> Callable[[list[dict]], list[dict]]:
    """The optimizer-group split that marks this layout's expert parameters for DeepSpeed."""
    return partial(split_expert_param_groups, group_name=groups.name)


def local_expert_state(
    state: Mapping[str, Tensor], model: nn.Module, groups: ExpertParallelGroups | None
) -> dict[str, Tensor]:
    """A global-layout ``state_dict`` cut to the expert slices that ``model`` holds on this rank."""
    if groups is None or groups.ep_size == 1:
        return dict(state)
    return shard_expert_state(state, expert_sharded_names(model), groups.ep_rank, groups.ep_size)
