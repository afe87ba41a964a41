"""Every DeepSpeed and Lightning internal that :class:`~sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy`
relies on, in one place, and the versions it was verified with.

Verified with deepspeed 0.19.8 and lightning 2.6.6 (the pins of ``pyproject.toml``). Private APIs change
without notice, so the strategy refuses other installed versions when it is built (:func:`check_versions`)
instead of failing somewhere inside a training step. What is used, and why:

DeepSpeed
  - ``deepspeed.comm.torch.build_shm_op``: a shared-memory all-reduce that DeepSpeed JIT-compiles for CPU
    (~55 s) on first use and gloo runs never call; replaced by a no-op on CPU.
  - ``deepspeed.moe.layer.MoE``: DeepSpeed treats parameters marked ``allreduce = False`` as expert parameters
    only when the model holds such a module; :func:`expert_parallel_marker` is one without weights.
  - ``deepspeed.utils.groups._get_expert_parallel_group_dict`` / ``_create_expert_and_data_parallel``: the
    marker creates DeepSpeed's expert groups with the rank layout of :mod:`sdmoe_train.parallel.groups`.
  - ``deepspeed.initialize(args=Namespace(device_rank=...))``: the device rank of a CPU process.
  - ZeRO 1/2 optimizers' ``dp_process_group`` and ``load_state_dict(list, load_optimizer_states,
    load_from_fp32_weights)``: restoring one rank's partition (:func:`load_zero_optimizer_state`).
  - The logger that ``import deepspeed`` binds to stdout (:func:`import_deepspeed_with_logs_on_stderr`).

Lightning
  - ``DeepSpeedStrategy.setup_environment`` refuses a CPU accelerator: CPU runs call
    ``DDPStrategy.setup_environment`` instead (:func:`setup_cpu_environment`).
  - ``DeepSpeedStrategy.setup_distributed`` passes ``root_device.index`` (None on CPU) on: CPU runs call
    ``set_world_ranks`` and the private ``_init_deepspeed_distributed`` themselves (:func:`setup_cpu_distributed`).
  - ``DeepSpeedStrategy._setup_model_and_optimizer``, ``lightning_restore_optimizer``,
    ``load_optimizer_state_dict``, ``load_model_state_dict``, ``save_checkpoint``, ``load_checkpoint``: the
    hooks the strategy overrides (names and call order as in 2.6.6).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import sys
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from sdmoe_train.errors import ConfigError

VERIFIED_VERSIONS = {"deepspeed": "0.19.8", "lightning": "2.6.6"}
"""Distribution name -> the version every internal listed in this module was verified with."""


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """Refuse installed DeepSpeed or Lightning versions other than the verified ones.

    Raises:
        ConfigError: naming the installed and the verified versions, and the install command.
    """
    installed = {name: _installed_version(name) for name in VERIFIED_VERSIONS}
    if installed == VERIFIED_VERSIONS:
        return
    found = ", ".join(f"{name} {version or 'not installed'}" for name, version in installed.items())
    verified = " and ".join(f"{name} {version}" for name, version in VERIFIED_VERSIONS.items())
    pins = " ".join(f"{name}=={version}" for name, version in VERIFIED_VERSIONS.items())
    raise ConfigError(
        f"MoEDeepSpeedStrategy overrides DeepSpeed and Lightning internals verified with {verified}, but this "
        f"environment has {found}; install the verified versions (pip install {pins}, or pip install -e "
        "'.[deepspeed]'), or use trainer.strategy=ddp without expert parallelism"
    )


def import_deepspeed_with_logs_on_stderr() -> None:
    """Import DeepSpeed (when installed) with its logger bound to stderr.

    DeepSpeed's logger binds ``sys.stdout`` when ``import deepspeed`` creates it and warns during that import
    on machines without CUDA. Importing it first with stdout pointed at stderr keeps every DeepSpeed log line
    off stdout, which carries data (``fit --print_config > recipe.yaml``). jsonargparse would otherwise import
    it while resolving the annotations of Lightning's DeepSpeedStrategy.
    """
    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    with contextlib.redirect_stdout(sys.stderr):
        importlib.import_module("deepspeed")


def setup_cpu_environment(strategy: Any) -> None:
    """``setup_environment`` of a CPU (gloo) run: DeepSpeed's CPU accelerator, no shm op build, no CUDA check."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # `import deepspeed.comm.torch as m` would bind the package attribute `torch`, not the module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    DDPStrategy.setup_environment(strategy)


def setup_cpu_distributed(strategy: Any) -> None:
    """``setup_distributed`` of a CPU run: CPU devices have no index, which Lightning's validation expects."""
    reset_seed()
    strategy.set_world_ranks()
    strategy._init_deepspeed_distributed()


def expert_parallel_marker(num_experts: int, ep_size: int, group_name: str) -> nn.Module:
    """A weightless ``deepspeed.moe.layer.MoE``: its presence switches on DeepSpeed's expert-parameter handling.

    Args:
        num_experts: E, all experts of a layer.
        ep_size: P, the expert-parallel group size.
        group_name: the name marked on the expert parameters (``ExpertParallelGroups.name``).
    """
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups as deepspeed_groups

    class _ExpertParallelMarker(MoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            # Same rank layout as sdmoe_train.parallel.groups (consecutive expert-parallel ranks).
            if self.expert_group_name not in deepspeed_groups._get_expert_parallel_group_dict():
                deepspeed_groups._create_expert_and_data_parallel(self.ep_size)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-parallel marker holds no experts; MoE layers dispatch themselves")

    return _ExpertParallelMarker()


def initialize_engine(
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: Any,
    device_rank: int,
) -> tuple[Any, torch.optim.Optimizer]:
    """``deepspeed.initialize`` on an already initialised process group; returns (engine, its optimizer)."""
    import deepspeed

    engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
        args=argparse.Namespace(device_rank=device_rank),
        config=config,
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dist_init_required=False,
    )
    return engine, deepspeed_optimizer


def load_zero_optimizer_state(optimizer: Any, state: Any) -> None:
    """Restore a rank's saved optimizer state into DeepSpeed's (ZeRO) optimizer."""
    if not hasattr(optimizer, "dp_process_group"):
        optimizer.load_state_dict(state)
        return
    # ZeRO 1/2 index the list by data-parallel rank; a same-layout resume reads its own entry only and
    # restores the fp32 master partition exactly.
    import deepspeed.comm as ds_comm

    states: list[Any] = [None] * ds_comm.get_world_size(group=optimizer.dp_process_group)
    states[ds_comm.get_rank(group=optimizer.dp_process_group)] = state
    optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
