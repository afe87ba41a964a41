"""Gradient-subspace alignment between experts, and gradient energy in the common subspace (docs/design/sdmoe.md §8)."""

# Shape key: E experts, L experts on this rank, M matrix rows (out), N matrix columns (in), K common rank.

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks.monitor import Figure, IntervalMonitor, layer_name
from sdmoe_train.lightning.callbacks.spectral_overlap import (
    SIDES,
    add_pair_statistics,
    check_rank,
    check_svd_method,
    side_similarities,
)
from sdmoe_train.lightning.contract import training_module
from sdmoe_train.moe.diagnostics import SVDMethod, common_energy_share, top_singular_subspaces
from sdmoe_train.moe.experts import MATRIX_TYPES, ExpertBank, MatrixType
from sdmoe_train.parallel.groups import ExpertParallelGroups
from sdmoe_train.parallel.monitoring import expert_mean, gather_experts


def common_bases(
    bank: ExpertBank, matrix: MatrixType, rank: int, svd: SVDMethod, groups: ExpertParallelGroups | None = None
) -> tuple[Tensor, Tensor]:
    """(U_k, V_k) of the layer's common subspace for one matrix type.

    SD-MoE: the bank's own bases (replicated under expert parallelism). Vanilla MoE, which has no common
    part: the top-k singular subspaces of the mean weight of all E experts, the direction all experts share
    (our definition, so that both arms get a number); under expert parallelism that mean is one (M, N)
    all-reduce over the expert-parallel group.
    """
    bases = bank.common_bases(matrix)
    if bases is not None:
        return bases
    return top_singular_subspaces(expert_mean(bank.applied_weight(matrix), groups), rank, svd)


class GradientAlignmentMonitor(IntervalMonitor):
    """E×E similarity of the experts' gradient subspaces over a window, plus their common-subspace energy.

    The per-expert gradients ``G_i`` of the last ``window`` optimizer steps of every interval are summed on
    the device (after gradient accumulation and the data-parallel all-reduce, before SD-MoE's projection,
    clipping and the step: Lightning runs callbacks' ``on_before_optimizer_step`` before the module's). At
    the interval's last step the sums are measured like the weights in
    :class:`~sdmoe_train.lightning.callbacks.spectral_overlap.SpectralOverlapMonitor`. Logged:
    ``gradient/<type>_<side>_alignment_{mean,max}/layer_NN``, ``gradient/<type>_common_energy_share/layer_NN``
    (mean over experts of ``‖G_i − G_u[i]‖² / ‖G_i‖²``, see :func:`common_bases` for the vanilla subspace),
    and the means over layers and types ``gradient/alignment_{mean,max}``, ``gradient/common_energy_share``.
    Figures: the side-averaged E×E matrix per (type, layer). Under expert parallelism each rank sums and
    factorises the gradients of its own experts; the bases and energy shares are all-gathered.

    The window holds one copy of every monitored expert gradient; restrict ``layers`` on large models.

    Args:
        every_n_steps: optimizer steps per interval.
        window: optimizer steps at the end of each interval whose gradients are summed (<= every_n_steps).
        layers: block indices to monitor (None: every MoE layer).
        rank: r of the gradient subspaces compared.
        common_rank: k of the vanilla model's common subspace (SD-MoE uses its own bases).
        matrices: expert matrix types to measure.
        svd: ``lowrank`` (batched randomised SVD, fixed seed) or ``full`` (batched ``torch.linalg.svd``).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        window: int = 8,
        layers: list[int] | None = None,
        rank: int = 8,
        common_rank: int = 8,
        matrices: list[MatrixType] | None = None,
        svd: SVDMethod = "lowrank",
    ) -> None:
        super().__init__(every_n_steps, layers)
        self.svd = check_svd_method(type(self).__name__, svd)
        if not 1 <= window <= every_n_steps:
            raise ConfigError(
                f"GradientAlignmentMonitor.window={window} must lie in [1, every_n_steps={every_n_steps}]"
            )
        self.window = window
        self.rank = rank
        self.common_rank = common_rank
        self.matrices: list[MatrixType] = list(MATRIX_TYPES) if matrices is None else list(matrices)
        unknown = [matrix for matrix in self.matrices if matrix not in MATRIX_TYPES]
        if unknown or not self.matrices:
            raise ConfigError(
                f"GradientAlignmentMonitor.matrices={self.matrices} must be a non-empty subset of {list(MATRIX_TYPES)}"
            )
        self._sums: dict[str, Tensor] = {}
        self._steps_summed = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        bank = self.monitored[0][1].experts
        check_rank(type(self).__name__, self.rank, bank, self.matrices)
        check_rank(f"{type(self).__name__}.common", self.common_rank, bank, self.matrices)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        steps_after_this = -(trainer.global_step + 1) % self.every_n_steps
        if steps_after_this >= self.window:
            return
        with torch.no_grad():
            for index, layer in self.monitored:
                for matrix in self.matrices:
                    # Read before PretrainModule.on_before_optimizer_step splits SD-MoE gradients
                    # (docs/design/sdmoe.md §4).
                    grad_LMN = layer.experts.applied_weight_grad(matrix)
                    if grad_LMN is None:
                        continue
                    key = f"{index}.{matrix}"
                    total = self._sums.get(key)
                    self._sums[key] = (
                        grad_LMN.float().clone() if total is None else total.to(grad_LMN.device) + grad_LMN
                    )
        self._steps_summed += 1

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval_completed(trainer) and self._sums:
            scalars, figures = self.measure(training_module(pl_module, type(self).__name__).expert_groups)
            self.publish(trainer, scalars, figures)
            self._sums, self._steps_summed = {}, 0

    @torch.no_grad()
    def measure(self, groups: ExpertParallelGroups | None = None) -> tuple[dict[str, Tensor | float], list[Figure]]:
        """Alignment statistics and matrices of the summed window gradients of all E experts.

        Args:
            groups: the expert-parallel layout (None: this rank holds every expert); with expert parallelism
                a collective over the expert-parallel group.
        """
        scalars: dict[str, Tensor | float] = {}
        figures: list[Figure] = []
        summaries: dict[str, list[Tensor]] = {}
        for index, layer in self.monitored:
            for matrix in self.matrices:
                grads_LMN = self._sums.get(f"{index}.{matrix}")
                if grads_LMN is None:
                    continue
                similarities_EE = side_similarities(grads_LMN, self.rank, self.svd, groups)
                similarities = dict(zip(SIDES, similarities_EE, strict=True))
                for side, similarity_EE in similarities.items():
                    metric = f"gradient/{matrix}_{side}_alignment"
                    add_pair_statistics(scalars, summaries, similarity_EE, metric, index, "gradient/alignment")
                left_MK, right_NK = common_bases(layer.experts, matrix, self.common_rank, self.svd, groups)
                share = gather_experts(common_energy_share(grads_LMN, left_MK, right_NK), groups).mean()
                scalars[f"gradient/{matrix}_common_energy_share/{layer_name(index)}"] = share
                summaries.setdefault("gradient/common_energy_share", []).append(share)
                average_EE = (similarities["left"] + similarities["right"]) / 2
                figures.append(
                    Figure(f"gradient/alignment_{matrix}/{layer_name(index)}", average_EE, "expert", "expert")
                )
        scalars.update({name: torch.stack(values).mean() for name, values in summaries.items()})
        scalars["gradient/window_steps"] = float(self._steps_summed)
        return scalars, figures

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sums": dict(self._sums), "steps_summed": self._steps_summed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._sums = dict(state_dict["sums"])
        self._steps_summed = state_dict["steps_summed"]
