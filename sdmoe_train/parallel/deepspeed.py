"""DeepSpeed ZeRO (stages 0-2) with expert parallelism, on GPUs (NCCL) and CPU processes (gloo).

:class:`MoEDeepSpeedStrategy` is Lightning's ``DeepSpeedStrategy`` plus what this framework needs; every
DeepSpeed or Lightning internal it touches is in :mod:`sdmoe_train.parallel.deepspeed_compat`, which says
which versions it was verified with (the strategy refuses others):

- CPU runs: Lightning refuses a CPU accelerator and has no device index to pass to DeepSpeed, and DeepSpeed
  JIT-builds a shared-memory comm op that gloo runs never call; all three are bypassed.
- Expert parallelism: DeepSpeed treats parameters marked ``allreduce = False`` as expert parameters only
  when the model holds a ``deepspeed.moe.layer.MoE`` module; a weightless one is added, so DeepSpeed
  broadcasts, reduces and partitions expert slices over the expert-data-parallel group only (expert
  gradients are divided by the whole data-parallel size, so their scale does not depend on ``ep_size``).
- Checkpoints: DeepSpeed's own MoE checkpoint format keys experts by its ``deepspeed_moe`` module names, so
  each rank instead writes one file ``rank_XXXXX.pt`` into the checkpoint directory with its model shard
  and its ZeRO optimizer partition (:mod:`sdmoe_train.parallel.rank_files`). Resuming needs the same world
  size and ``ep_size``; ``sdmoe-train consolidate`` (:mod:`sdmoe_train.checkpointing.consolidate`) turns a
  directory into one file that any layout starts from (``model.init_from``).

ZeRO stage 3 is refused with a ConfigError: with expert parallelism DeepSpeed itself rejects it ("Native
DeepSpeed MoE is not supported with ZeRO Stage 3"), and without it the first backward fails on partitioned
weights (see docs/distributed.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel import deepspeed_compat
from sdmoe_train.parallel.expert_parallel import expert_sharded_names
from sdmoe_train.parallel.groups import ExpertParallelGroups
from sdmoe_train.parallel.rank_files import LAYOUT_KEY, rank_file

deepspeed_compat.import_deepspeed_with_logs_on_stderr()


class MoEDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy for MoE models with expert parallelism, also on CPU (gloo).

    Takes every argument of ``lightning.pytorch.strategies.DeepSpeedStrategy`` (``stage``, ``config``, ...).
    """

    supports_expert_parallel = True
    """Read by ``PretrainModule.configure_model``: this strategy reduces expert gradients per expert group."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        deepspeed_compat.check_versions()
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            deepspeed_compat.setup_cpu_environment(self)
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            deepspeed_compat.setup_cpu_distributed(self)
            return
        super().setup_distributed()

    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, torch.optim.Optimizer]:
        groups: ExpertParallelGroups | None = getattr(self.lightning_module, "expert_groups", None)
        if self.zero_stage_3:
            raise self._zero_stage_3_refusal()
        if groups is not None and groups.ep_size > 1:
            num_experts = self.lightning_module.arch.moe.num_experts
            marker = deepspeed_compat.expert_parallel_marker(num_experts, groups.ep_size, groups.name)
            model.add_module("deepspeed_expert_parallel", marker)
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        return deepspeed_compat.initialize_engine(self.config, model, optimizer, lr_scheduler, device_rank)

    @contextlib.contextmanager
    def model_sharded_context(self) -> Iterator[None]:
        # ZeRO-3 would run `configure_model` inside `deepspeed.zero.Init`, whose partitioned parameters the
        # model's materialisation cannot initialise: refuse it before anything is built.
        if self.zero_stage_3:
            raise self._zero_stage_3_refusal()
        with super().model_sharded_context():
            yield

    def _zero_stage_3_refusal(self) -> ConfigError:
        parallel = getattr(self.lightning_module, "parallel", None)
        ep_size = 1 if parallel is None else parallel.ep_size
        if ep_size > 1:
            reason = f"model.parallel.ep_size={ep_size} needs ZeRO stage 0, 1 or 2 (DeepSpeed's MoE rejects ZeRO-3)"
        else:
            # Tested with DeepSpeed 0.19.8: the first backward fails inside autograd with "The size of
            # tensor a (0) must match the size of tensor b (128)" (a partitioned weight meets its gradient).
            reason = "ZeRO stage 3 does not train this model (its backward fails on partitioned weights)"
        return ConfigError(f"{reason}; set the strategy's stage to 1 or 2 (docs/distributed.md)")

    def _layout(self) -> dict[str, Any]:
        groups: ExpertParallelGroups | None = getattr(self.lightning_module, "expert_groups", None)
        return {
            "world_size": self.world_size,
            "global_rank": self.global_rank,
            "ep_size": 1 if groups is None else groups.ep_size,
            "ep_rank": 0 if groups is None else groups.ep_rank,
            "sharded": expert_sharded_names(self.lightning_module),
        }

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        """Every rank writes its own ``rank_XXXXX.pt`` (model shard, ZeRO partition) into directory ``filepath``."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        directory = Path(self.broadcast(str(filepath)))
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({**checkpoint, LAYOUT_KEY: self._layout()}, rank_file(directory, self.global_rank))
        self.barrier("save_checkpoint")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = rank_file(checkpoint_path, self.global_rank)
        if not path.is_file():
            raise ConfigError(
                f"ckpt_path={str(checkpoint_path)!r} has no {path.name}: resuming with {type(self).__name__} takes "
                "a checkpoint directory it wrote with the same number of processes; to start from other weights "
                "use model.init_from (with a file from `sdmoe-train consolidate`)"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved, current = checkpoint[LAYOUT_KEY], self._layout()
        for key in ("world_size", "ep_size"):
            if saved[key] != current[key]:
                raise ConfigError(
                    f"ckpt_path={str(checkpoint_path)!r} was written with {key}={saved[key]}, this run has "
                    f"{key}={current[key]}; resume with the same layout, or consolidate it "
                    "(`sdmoe-train consolidate DIR OUT.ckpt`) and start from it with model.init_from"
                )
        return checkpoint

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        # The module's parameters are views of ZeRO's flat buffers, so an in-place load updates those too.
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return self.lightning_module.trainer.state.fn == TrainerFn.FITTING

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        deepspeed_compat.load_zero_optimizer_state(self.deepspeed_engine.optimizer, checkpoint["optimizer_states"][0])
