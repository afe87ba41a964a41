"""The four monitors measured on an expert-sharded model, for tests/integration/test_expert_parallel.py (no tests here).

Plain ``torch.distributed`` (gloo, ``mp.spawn``), no Trainer: every rank builds the same full model (expert 5
a copy of expert 0, so one pair of identical experts sits on different ranks), shards it with
``apply_expert_parallel``, gives its experts their slice of the same global gradients, routes its rows of
the token batch and calls each monitor's ``measure`` with the expert-parallel groups. The reference measures
the unsharded model on the whole batch in one process, with no groups.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdmoe_train.lightning.callbacks import (
    GateAlignmentMonitor,
    GradientAlignmentMonitor,
    RoutingHealthMonitor,
    SpectralOverlapMonitor,
)
from sdmoe_train.lightning.callbacks.monitor import IntervalMonitor
from sdmoe_train.models.transformer import Transformer
from sdmoe_train.moe.sdmoe import apply_spectral_decoupling
from sdmoe_train.parallel.expert_parallel import apply_expert_parallel
from sdmoe_train.parallel.groups import ExpertParallelGroups, build_expert_parallel_groups
from tests.integration.expert_parallel_runs import ep_arch
from tests.integration.sdmoe_ddp import SDMOE, _one_thread, global_batches

RANK = 3
"""r of the overlap and gradient subspaces (and k of the vanilla common subspace)."""
TWIN_EXPERTS = (0, 5)
"""Expert 5 starts as a copy of expert 0 and gets the same gradient: ranks 0 and 1 of a 2-way split."""

Measurement = dict[str, tuple[dict[str, float], dict[str, torch.Tensor]]]
"""Monitor label -> (scalars, figure matrices by name)."""


class _OneProcessStrategy:
    """Lightning's strategy interface as one process answers it."""

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        return tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


class _ProcessGroupStrategy:
    """Lightning's strategy interface over the default process group (what DDP and DeepSpeed do)."""

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total if reduce_op == "sum" else total / dist.get_world_size()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def _build(sdmoe: bool) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ep_arch())
    if sdmoe:
        apply_spectral_decoupling(model, SDMOE)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            for param in layer.experts.parameters():
                if param.dim() == 3:  # the stacked (E, out, in) banks; SD-MoE: the unique parts W_u
                    param[TWIN_EXPERTS[1]] = param[TWIN_EXPERTS[0]]
    return model.double()


def _plant_gradients(model: Transformer, groups: ExpertParallelGroups | None) -> None:
    """The same global (E, ...) gradient of every stacked expert parameter on every layout, sliced per rank."""
    generator = torch.Generator().manual_seed(1)
    for _, layer in model.moe_layers():
        num_experts = layer.config.num_experts
        per_rank = num_experts if groups is None else num_experts // groups.ep_size
        start = 0 if groups is None else groups.ep_rank * per_rank
        for _, param in sorted(layer.experts.named_parameters(recurse=False)):
            if param.dim() != 3:
                continue
            grad = torch.randn((num_experts, *param.shape[1:]), generator=generator, dtype=param.dtype)
            grad[TWIN_EXPERTS[1]] = grad[TWIN_EXPERTS[0]]
            param.grad = grad[start : start + per_rank].clone()


def _readable(result: tuple[dict[str, Any], list]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    scalars, figures = result
    values = {name: float(value) for name, value in scalars.items()}
    return values, {figure.name: figure.values.detach().clone() for figure in figures}


def measure_monitors(
    model: Transformer, tokens_BS: torch.Tensor, groups: ExpertParallelGroups | None, strategy: Any
) -> Measurement:
    """Every monitor's statistics of ``model`` (sharded when ``groups`` is given); ``tokens_BS`` are this rank's."""
    module = SimpleNamespace(model=model, last_routing=None, expert_groups=groups, step_skipped=False, tokens_seen=0)
    trainer = SimpleNamespace(global_step=0, strategy=strategy)

    def ready(monitor: IntervalMonitor) -> Any:
        monitor.setup(trainer, module, "fit")
        return monitor

    measured: Measurement = {}
    for svd in ("full", "lowrank"):
        overlap = ready(SpectralOverlapMonitor(every_n_steps=1, rank=RANK, svd=svd))
        measured[f"overlap_{svd}"] = _readable(overlap.measure(groups))
    _plant_gradients(model, groups)
    gradient = ready(GradientAlignmentMonitor(every_n_steps=1, window=1, rank=RANK, common_rank=RANK, svd="full"))
    gradient.on_before_optimizer_step(trainer, module, None)
    measured["gradient"] = _readable(gradient.measure(groups))
    gate = ready(GateAlignmentMonitor(every_n_steps=1, directions=4, probe_sequences=2))
    gate.on_train_batch_start(trainer, module, global_batches()[1], 0)
    measured["gate"] = _readable(gate.measure(model, groups))
    routing = ready(RoutingHealthMonitor(every_n_steps=1))
    with torch.no_grad():
        module.last_routing = model(tokens_BS).moe
    routing.on_train_batch_end(trainer, module, None, None, 0)  # step 0 ends no interval: it only counts
    measured["routing"] = _readable(routing.measure(strategy))
    return measured


def _worker(rank: int, world_size: int, sdmoe: bool, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        groups = build_expert_parallel_groups(world_size)
        model = _build(sdmoe)
        apply_expert_parallel(model, groups)
        tokens_BS = global_batches()[0, rank::world_size, :-1]
        record = measure_monitors(model, tokens_BS, groups, _ProcessGroupStrategy())
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_measurements(tmp_path: Path, sdmoe: bool, world_size: int = 2) -> list[Measurement]:
    """Each rank's measurements with every expert bank split over ``world_size`` ranks."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(world_size, sdmoe, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def single_process_measurements(sdmoe: bool) -> Measurement:
    """The same measurements of the unsharded model on the whole batch in one process."""
    with _one_thread():
        return measure_monitors(_build(sdmoe), global_batches()[0, :, :-1], None, _OneProcessStrategy())
