"""Expert-parallel and expert-data-parallel process groups.

With world size W and expert-parallel size P, ranks ``[g·P, (g+1)·P)`` form expert-parallel group g (they
hold disjoint slices of the experts and exchange tokens), and ranks ``{r, r+P, r+2P, ...}`` form an
expert-data-parallel group (they hold the same experts and average their gradients). This is the layout
DeepSpeed's ``groups._create_expert_and_data_parallel`` builds, so both agree on who holds what.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's place in the expert-parallel layout."""

    ep_size: int
    """P: ranks sharing one copy of the experts."""
    ep_rank: int
    """Index of this rank inside its expert-parallel group; it holds experts [ep_rank·E/P, (ep_rank+1)·E/P)."""
    world_size: int
    """W: all ranks."""
    ep_group: dist.ProcessGroup | None
    """Process group of the P ranks that exchange tokens (None when P is 1)."""
    expert_dp_group: dist.ProcessGroup | None
    """Process group of the W/P ranks holding the same experts (None when W/P is 1)."""

    @property
    def name(self) -> str:
        """Group name marked on expert parameters (DeepSpeed's ``param.group_name`` convention)."""
        return f"ep_size_{self.ep_size}"


def build_expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Create the groups for ``ep_size`` on an initialised default process group; every rank must call it.

    Single-process runs (no process group) get a trivial layout with ``ep_size`` 1.
    """
    if not dist.is_available() or not dist.is_initialized():
        assert ep_size == 1, "expert parallelism needs an initialised process group"
        return ExpertParallelGroups(ep_size=1, ep_rank=0, world_size=1, ep_group=None, expert_dp_group=None)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    assert world_size % ep_size == 0, f"ep_size={ep_size} does not divide world size {world_size}"
    ep_group = expert_dp_group = None
    # new_group is collective: every rank creates every group, in the same order, and keeps its own.
    for start in range(0, world_size, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    for offset in range(ep_size):
        group = dist.new_group(list(range(offset, world_size, ep_size)))
        if rank % ep_size == offset:
            expert_dp_group = group
    return ExpertParallelGroups(
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        world_size=world_size,
        ep_group=ep_group if ep_size > 1 else None,
        expert_dp_group=expert_dp_group if world_size > ep_size else None,
    )
