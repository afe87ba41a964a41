"""Expert sharding: split each MoE layer's routed experts over an expert-parallel group.

:func:`apply_expert_parallel` keeps on each rank the slice ``[ep_rank·L, (ep_rank+1)·L)`` (L = E/P) of every
stacked per-expert tensor of every routed bank (plain banks and SD-MoE's unique parts ``W_u``) and swaps in
the :class:`~sdmoe_train.parallel.all_to_all.AllToAllDispatcher`. Router, correction bias, shared experts
and SD-MoE's common part ``W_c`` and bases stay replicated. Sharded parameters carry DeepSpeed's expert
marks (``allreduce = False``, ``group_name``), which is how DeepSpeed (and :func:`average_gradients`) know
to reduce their gradients over the expert-data-parallel group only.

State dicts use the *global* layout for exchange between layouts: :func:`merge_expert_shards` and
:func:`shard_expert_state` convert between per-rank shards and full (E, ...) tensors, so a checkpoint
written at one ``ep_size`` loads at any other.
"""

# Shape key: E experts, L experts per rank, P ranks of the expert-parallel group.

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sdmoe_train.models.transformer import Transformer
from sdmoe_train.parallel.all_to_all import AllToAllDispatcher
from sdmoe_train.parallel.groups import ExpertParallelGroups


def is_expert_parameter(param: Tensor) -> bool:
    """Whether a parameter is one rank's slice of the experts (DeepSpeed's ``is_moe_param`` test)."""
    return getattr(param, "allreduce", True) is False


def expert_sharded_names(module: nn.Module) -> list[str]:
    """``state_dict`` keys of the expert-sharded parameters of ``module`` (any wrapper level)."""
    return [name for name, param in module.named_parameters() if is_expert_parameter(param)]


def apply_expert_parallel(model: Transformer, groups: ExpertParallelGroups) -> None:
    """Keep this rank's slice of every routed bank and exchange tokens by all-to-all; call once, on every rank.

    The model must hold the full experts, identical on every rank (same seed, or loaded from the same
    weights), so that sharding reproduces the ``ep_size=1`` model exactly.
    """
    if groups.ep_size == 1:
        return
    for _, layer in model.moe_layers():
        num_experts = layer.config.num_experts
        per_rank = num_experts // groups.ep_size
        start = groups.ep_rank * per_rank
        bank = layer.experts
        assert bank.num_experts == num_experts, "experts are already sharded"
        for name, param in list(bank.named_parameters(recurse=False)):
            # Stacked (E, out, in) banks are per-expert; SD-MoE's 2-D common part W_c is shared.
            if param.dim() != 3:
                continue
            local = nn.Parameter(param.detach()[start : start + per_rank].clone(), requires_grad=param.requires_grad)
            local.allreduce = False
            local.group_name = groups.name
            setattr(bank, name, local)
        bank.num_experts = per_rank
        bank.expert_offset = start
        capacity_factor = layer.config.capacity_factor
        layer.dispatcher = AllToAllDispatcher(num_experts, groups.ep_size, groups.ep_group, capacity_factor)


@torch.no_grad()
def average_gradients(module: nn.Module, groups: ExpertParallelGroups) -> None:
    """Data-parallel gradient averaging for a hand-written loop (Lightning's strategies do their own).

    Replicated parameters: summed over all W ranks. Expert slices: summed over the expert-data-parallel group
    (their gradient already holds every expert-parallel peer's tokens, through the all-to-all backward).
    Both are divided by W, so the result equals the gradient of the mean loss at any ``ep_size``.
    """
    for param in module.parameters():
        if param.grad is None:
            continue
        if is_expert_parameter(param):
            if groups.expert_dp_group is not None:
                dist.all_reduce(param.grad, group=groups.expert_dp_group)
        else:
            dist.all_reduce(param.grad)
        param.grad.div_(groups.world_size)


def gather_expert_tensors(
    tensors: Mapping[str, Tensor], sharded: Iterable[str], groups: ExpertParallelGroups
) -> dict[str, Tensor]:
    """``tensors`` with every sharded entry all-gathered over the expert-parallel group into its (E, ...) form."""
    sharded = set(sharded)
    full = dict(tensors)
    if groups.ep_size == 1:
        return full
    for name in sorted(sharded & tensors.keys()):
        pieces = [torch.empty_like(tensors[name]) for _ in range(groups.ep_size)]
        dist.all_gather(pieces, tensors[name].contiguous(), group=groups.ep_group)
        full[name] = torch.cat(pieces)
    return full


def merge_expert_shards(shards: list[Mapping[str, Tensor]], sharded: Iterable[str]) -> dict[str, Tensor]:
    """One global state dict from the state dicts of the P ranks of one expert-parallel group, in ep-rank order."""
    sharded = set(sharded)
    merged = dict(shards[0])
    for name in sharded & merged.keys():
        merged[name] = torch.cat([shard[name] for shard in shards])
    return merged


def shard_expert_state(
    state: Mapping[str, Tensor], sharded: Iterable[str], ep_rank: int, ep_size: int
) -> dict[str, Tensor]:
    """The slice of a global state dict that expert-parallel rank ``ep_rank`` of ``ep_size`` holds."""
    local = dict(state)
    for name in set(sharded) & state.keys():
        per_rank = state[name].shape[0] // ep_size
        local[name] = state[name][ep_rank * per_rank : (ep_rank + 1) * per_rank]
    return local


def split_expert_param_groups(param_groups: list[dict], group_name: str) -> list[dict]:
    """Move expert parameters into their own optimizer groups, marked the way DeepSpeed's ZeRO expects.

    Every group keeps its hyper-parameters; its expert parameters go to a copy with ``moe: True`` and
    ``name: group_name`` (what ``deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer``
    produces), so ZeRO partitions and reduces them over the expert-data-parallel group.
    """
    split = []
    for group in param_groups:
        experts = [p for p in group["params"] if is_expert_parameter(p)]
        shared = [p for p in group["params"] if not is_expert_parameter(p)]
        if shared:
            split.append({**group, "params": shared})
        if experts:
            split.append({**group, "params": experts, "moe": True, "name": group_name})
    return split
