"""Expert-parallel training runs for tests/integration/test_expert_parallel.py (no tests here).

Plain ``torch.distributed`` (gloo, ``mp.spawn``) around a hand-written loop, no Lightning in the workers, so
two ranks start in seconds. Every rank builds the same full model, shards its experts with
``apply_expert_parallel`` and trains on its rows of each global batch; the reference trains the unsharded
model on whole global batches in one process. Both record the first step's loss and gradients and the final
state, in the global (E, ...) layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import (
    apply_spectral_decoupling,
    finish_optimizer_step,
    project_gradients,
    strict_update_reference,
)
from sdmoe_train.parallel.expert_parallel import (
    apply_expert_parallel,
    average_gradients,
    expert_sharded_names,
    gather_expert_tensors,
)
from sdmoe_train.parallel.groups import ExpertParallelGroups, build_expert_parallel_groups
from sdmoe_train.parallel.monitoring import expert_factors
from tests.integration.sdmoe_ddp import SDMOE, _one_thread, global_batches, tiny_arch

FACTOR_RANK = 3
"""Singular triplets per expert gathered for monitoring."""


def ep_arch() -> TransformerConfig:
    """The SD-MoE DDP test's tiny model with the aux-loss-free bias update on, so the bias must stay in sync."""
    arch = tiny_arch()
    arch.moe.bias_update_rate = 1e-3
    return arch


def _build(sdmoe: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ep_arch())
    if sdmoe:
        apply_spectral_decoupling(model, SDMOE)
    return model.double()


def _train(model: Transformer, batches: torch.Tensor, groups: ExpertParallelGroups | None) -> dict[str, dict]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sharded = expert_sharded_names(model)
    record: dict[str, dict] = {}
    for step, batch in enumerate(batches):
        optimizer.zero_grad()
        out = model(batch[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten()) + out.moe.loss
        loss.backward()
        counts_LE = out.moe.tokens_per_expert_LE.clone()
        if groups is not None:
            average_gradients(model, groups)
            dist.all_reduce(counts_LE)
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= groups.world_size
        project_gradients(model)
        if step == 0:
            grads = {name: param.grad.clone() for name, param in model.named_parameters()}
            record["first_step"] = {"loss": loss.detach().clone(), **_global(grads, sharded, groups)}
        reference = strict_update_reference(model)
        optimizer.step()
        finish_optimizer_step(model, reference)
        model.update_routing_biases(counts_LE)
    record["state"] = _global(model.state_dict(), sharded, groups)
    record["factors"] = {key: f.low_rank() for key, f in expert_factors(model, FACTOR_RANK, groups).items()}
    return record


def _global(tensors: dict[str, torch.Tensor], sharded: list[str], groups: ExpertParallelGroups | None) -> dict:
    return dict(tensors) if groups is None else gather_expert_tensors(tensors, sharded, groups)


def _worker(rank: int, world_size: int, ep_size: int, sdmoe: bool, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        groups = build_expert_parallel_groups(ep_size)
        model = _build(sdmoe)
        apply_expert_parallel(model, groups)
        record = _train(model, global_batches()[:, rank::world_size], groups)
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_run(tmp_path: Path, ep_size: int, sdmoe: bool, world_size: int = 2) -> list[dict]:
    """First-step loss and gradients and final state (global layout) of every rank."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, ep_size, sdmoe, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def single_process_run(sdmoe: bool) -> dict:
    """The same steps on whole global batches in one process, unsharded."""
    with _one_thread():
        return _train(_build(sdmoe), global_batches(), None)
