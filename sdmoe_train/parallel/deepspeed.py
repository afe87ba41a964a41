"""DeepSpeed ZeRO (stages 0-2) with expert parallelism, on GPUs (NCCL) and CPU processes (gloo).

:class:`MoEDeepSpeedStrategy` is Lightning's ``DeepSpeedStrategy`` plus what this framework needs:

- CPU runs: Lightning 2.6.6 refuses a CPU accelerator and passes ``root_device.index`` (None on CPU) as
  DeepSpeed's device rank; DeepSpeed JIT-builds a shared-memory comm op (~55 s) on first use that gloo
  runs never call. Both are bypassed here (platform facts §3), which is why lightning is pinned.
- Expert parallelism: DeepSpeed treats parameters marked ``allreduce = False`` as expert parameters only
  when the model holds a ``deepspeed.moe.layer.MoE`` module; :class:`_ExpertParallelMarker` is such a
  module without weights, so DeepSpeed broadcasts, reduces and partitions expert slices over the
  expert-data-parallel group only (expert gradients are divided by the whole data-parallel size, so their
  scale does not depend on ``ep_size``).
- Checkpoints: DeepSpeed's own MoE checkpoint format keys experts by its ``deepspeed_moe`` module names, so
  each rank instead writes one file ``rank_XXXXX.pt`` into the checkpoint directory with its model shard
  and its ZeRO optimizer partition. Resuming needs the same world size and ``ep_size``;
  :func:`sdmoe_train.parallel.checkpoint.consolidate_checkpoint` turns a directory into one file that any
  layout starts from (``model.init_from``).

ZeRO stage 3 is refused with a ConfigError: with expert parallelism DeepSpeed itself rejects it ("Native
DeepSpeed MoE is not supported with ZeRO Stage 3"), and without it the first backward fails on partitioned
weights (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from sdmoe_train.errors import ConfigError
from sdmoe_train.parallel.expert_parallel import expert_sharded_names
from sdmoe_train.parallel.groups import ExpertParallelGroups


def _import_deepspeed_with_logs_on_stderr() -> None:
    # DeepSpeed's logger binds `sys.stdout` when `import deepspeed` creates it and warns during that import
    # on machines without CUDA. Importing it here first, with stdout pointed at stderr, keeps every DeepSpeed
    # log line off stdout, which carries data (`fit --print_config > recipe.yaml`). jsonargparse would
    # otherwise import it while resolving the annotations of Lightning's DeepSpeedStrategy.
    if "deepspeed" in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    with contextlib.redirect_stdout(sys.stderr):
        importlib.import_module("deepspeed")


_import_deepspeed_with_logs_on_stderr()

LAYOUT_KEY = "sdmoe_train_layout"
"""Checkpoint entry recording the parallel layout a rank file was written with."""


def rank_file(directory: str | Path, global_rank: int) -> Path:
    """The file of one rank inside a checkpoint directory."""
    return Path(directory) / f"rank_{global_rank:05d}.pt"


def _skip_shm_comm_build() -> None:
    # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce for CPU (~55 s) that gloo runs never
    # use; `import deepspeed.comm.torch as m` would bind the package attribute `torch`, not the module.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def _expert_parallel_marker(num_experts: int, groups: ExpertParallelGroups) -> nn.Module:
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups as deepspeed_groups

    class _ExpertParallelMarker(MoE):
        """A weightless ``MoE`` instance: its presence switches on DeepSpeed's expert-parameter handling."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts = num_experts
            self.ep_size = groups.ep_size
            self.num_local_experts = num_experts // groups.ep_size
            self.expert_group_name = groups.name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            # Same rank layout as sdmoe_train.parallel.groups (consecutive expert-parallel ranks).
            if self.expert_group_name not in deepspeed_groups._get_expert_parallel_group_dict():
                deepspeed_groups._create_expert_and_data_parallel(self.ep_size)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the expert-parallel marker holds no experts; MoE layers dispatch themselves")

    return _ExpertParallelMarker()


class MoEDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy for MoE models with expert parallelism, also on CPU (gloo).

    Takes every argument of ``lightning.pytorch.strategies.DeepSpeedStrategy`` (``stage``, ``config``, ...).
    """

    supports_expert_parallel = True
    """Read by ``PretrainModule.configure_model``: this strategy reduces expert gradients per expert group."""

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            _skip_shm_comm_build()
            DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check
            return
        super().setup_environment()

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CPUAccelerator):
            # CPU devices have no index, which Lightning's device-index validation expects.
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()
            return
        super().setup_distributed()

    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[Any, torch.optim.Optimizer]:
        import deepspeed

        groups: ExpertParallelGroups | None = getattr(self.lightning_module, "expert_groups", None)
        if self.zero_stage_3:
            raise self._zero_stage_3_refusal()
        if groups is not None and groups.ep_size > 1:
            num_experts = self.lightning_module.arch.moe.num_experts
            model.add_module("deepspeed_expert_parallel", _expert_parallel_marker(num_experts, groups))
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

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
                "use model.init_from (with a file from `python -m sdmoe_train.parallel.checkpoint`)"
            )
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        saved, current = checkpoint[LAYOUT_KEY], self._layout()
        for key in ("world_size", "ep_size"):
            if saved[key] != current[key]:
                raise ConfigError(
                    f"ckpt_path={str(checkpoint_path)!r} was written with {key}={saved[key]}, this run has "
                    f"{key}={current[key]}; resume with the same layout, or consolidate it "
                    "(`python -m sdmoe_train.parallel.checkpoint DIR OUT.ckpt`) and start from it with model.init_from"
                )
        return checkpoint

    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        # The module's parameters are views of ZeRO's flat buffers, so an in-place load updates those too.
        self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)

    @property
    def lightning_restore_optimizer(self) -> bool:
        return self.lightning_module.trainer.state.fn == TrainerFn.FITTING

    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        optimizer = self.deepspeed_engine.optimizer
        state = checkpoint["optimizer_states"][0]
        if hasattr(optimizer, "dp_process_group"):
            # ZeRO 1/2 index the list by data-parallel rank; a same-layout resume reads its own entry only and
            # restores the fp32 master partition exactly.
            import deepspeed.comm as ds_comm

            states: list[Any] = [None] * ds_comm.get_world_size(group=optimizer.dp_process_group)
            states[ds_comm.get_rank(group=optimizer.dp_process_group)] = state
            optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            optimizer.load_state_dict(state)
