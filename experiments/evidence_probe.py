"""Measurements behind the SD-MoE evidence study: where the experts' shared structure lives, and how it leaks.

Two kinds of measurement, both over every MoE layer and routed-expert matrix type (gate, up, down):

**Structure** (:func:`structure_metrics`, every ``every_n_steps`` and on any model): for each set of expert
matrices X_1..X_E (``proxy``: the weights tokens see, W_c + W_u[i] under SD-MoE; ``unique``: W_u[i]) and each
side (``d``: the model-width side, D rows or columns; ``f``: the expert-width side, F),

- ``overlap_r{r}_{side}``: mean over expert pairs of ``sim(X_i, X_j; r) = ‖Q_iᵀQ_j‖²/r`` (Q: top-r singular
  vectors), the same definition as :class:`~sdmoe_train.lightning.callbacks.SpectralOverlapMonitor`;
- ``residual_overlap_k{k}_{side}``: the same at r = ``rank`` after removing from every X_i the top-k singular
  subspaces (both sides) of the mean matrix X̄ = mean_i X_i: what is left once the k directions that every
  expert shares most are gone (for the baseline: what SD-MoE's common part could take over at rank k);
- ``common_mode_share``: ``‖X̄‖² / mean_i ‖X_i‖²`` (1/E for independent experts, 1 for identical ones) and
  ``mean_top{k}_energy``: the part of it carried by the top-k singular values of X̄;
- unique parts only: ``leakage`` (share of ‖W_u[i]‖² that touches the current common subspace,
  ``‖P_U W + W P_V − P_U W P_V‖² / ‖W‖²``) and ``complement_overlap_{side}``: the overlap at r = ``rank`` of
  ``(I − P_U) W_u[i] (I − P_V)``, i.e. with the leaked part removed.

**Refresh cycle** (SD-MoE only, around every basis refresh): at the step before a refresh, the share inside
the common subspace of the raw (unprojected) gradient, the projected gradient, AdamW's first moment, AdamW's
normalised direction ``m / (√v + ε)`` and the applied update ΔW_u, and the unique parts' leakage before the
refresh; at the refresh step, the leakage against the new bases, how far the bases turned and how much of
W_c lies outside its own common subspace.

Metric names: ``probe/<part>/<quantity>`` (means over layers and matrix types) in the loggers' metrics,
logged at the optimizer step like the monitors. Used through the study recipe's ``trainer.callbacks``
(``evidence_probe.MechanismProbe``, with ``experiments/`` on PYTHONPATH).
"""

# Shape key: E experts, M matrix rows (out), N matrix columns (in), K common rank, R diagnostic rank.

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning as L
import torch
from torch import Tensor

from sdmoe_train.moe.diagnostics import off_diagonal_mean_max, subspace_similarity
from sdmoe_train.moe.sdmoe import MATRIX_TYPES, DecoupledExpertBank
from sdmoe_train.moe.spectral import common_subspace_part

MODEL_SIDE = {"gate": "right", "up": "right", "down": "left"}
"""Which side of each expert matrix has the model width D (gate/up are F×D, down is D×F)."""


def touching_share(matrices_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> Tensor:
    """Share of the total ``‖X‖²`` of a stack that touches the subspace (U_k, V_k): ``‖P_U X + X P_V − P_U X P_V‖²``.

    Returns:
        0-dim tensor in [0, 1] (0 for an all-zero stack).
    """
    matrices_EMN = matrices_EMN.detach().double()
    touching = common_subspace_part(matrices_EMN, left_MK.double(), right_NK.double()).square().sum()
    return touching / matrices_EMN.square().sum().clamp_min(1e-300)


def complement_part(matrices_EMN: Tensor, left_MK: Tensor, right_NK: Tensor) -> Tensor:
    """``(I − P_U) X (I − P_V)`` of every matrix of the stack, in fp64."""
    matrices_EMN = matrices_EMN.detach().double()
    return matrices_EMN - common_subspace_part(matrices_EMN, left_MK.double(), right_NK.double())


def pair_overlaps(matrices_EMN: Tensor, ranks: list[int]) -> dict[tuple[str, int], float]:
    """Mean over expert pairs of ``sim(X_i, X_j; r)`` for each side and rank, from one batched SVD."""
    left_EMX, _, right_adjoint_EXN = torch.linalg.svd(matrices_EMN.detach().double(), full_matrices=False)
    bases = {"left": left_EMX, "right": right_adjoint_EXN.transpose(-2, -1)}
    overlaps = {}
    for side, basis in bases.items():
        for rank in ranks:
            mean, _ = off_diagonal_mean_max(subspace_similarity(basis[..., :rank]))
            overlaps[side, rank] = float(mean)
    return overlaps


def side_name(matrix: str, side: str) -> str:
    """``d`` for the model-width side of a matrix type, ``f`` for the expert-width side."""
    return "d" if MODEL_SIDE[matrix] == side else "f"


def expert_sets(bank: Any) -> dict[str, dict[str, Tensor]]:
    """``{part: {matrix type: (E, M, N)}}``: ``proxy`` always, ``unique`` for the types SD-MoE decomposes."""
    sets: dict[str, dict[str, Tensor]] = {"proxy": {}}
    for matrix, weights_EMN in zip(MATRIX_TYPES, bank.expert_weights(), strict=True):
        sets["proxy"][matrix] = weights_EMN.detach()
        if isinstance(bank, DecoupledExpertBank) and matrix in bank.decomposed:
            sets.setdefault("unique", {})[matrix] = bank.parts(matrix)[1].detach()
    return sets


@torch.no_grad()
def matrix_structure(
    matrices_EMN: Tensor, matrix: str, ranks: list[int], removed_ranks: list[int], rank: int
) -> dict[str, float]:
    """Structure metrics of one stack of expert matrices (see the module docstring), unaggregated."""
    metrics: dict[str, float] = {}
    for (side, r), value in pair_overlaps(matrices_EMN, ranks).items():
        metrics[f"overlap_r{r}_{side_name(matrix, side)}"] = value
    matrices_EMN = matrices_EMN.detach().double()
    mean_MN = matrices_EMN.mean(dim=0)
    expert_energy = matrices_EMN.square().sum(dim=(-2, -1)).mean()
    metrics["common_mode_share"] = float(mean_MN.square().sum() / expert_energy)
    mean_left_MX, mean_values_X, mean_right_adjoint_XN = torch.linalg.svd(mean_MN, full_matrices=False)
    for k in removed_ranks:
        metrics[f"mean_top{k}_energy"] = float(mean_values_X[:k].square().sum() / expert_energy)
        residual_EMN = complement_part(matrices_EMN, mean_left_MX[:, :k], mean_right_adjoint_XN[:k].T)
        for (side, _), value in pair_overlaps(residual_EMN, [rank]).items():
            metrics[f"residual_overlap_k{k}_{side_name(matrix, side)}"] = value
    return metrics


@torch.no_grad()
def structure_metrics(
    model: torch.nn.Module, ranks: list[int], removed_ranks: list[int], rank: int
) -> dict[str, float]:
    """Structure metrics of every MoE layer, averaged over layers and matrix types: ``probe/<part>/<name>``.

    Args:
        model: a :class:`~sdmoe_train.models.transformer.Transformer` (plain or SD-MoE).
        ranks: subspace dimensions r of ``overlap_r{r}_*``.
        removed_ranks: k of ``residual_overlap_k{k}_*`` and ``mean_top{k}_energy``.
        rank: r of the residual and complement overlaps.
    """
    values: dict[str, list[float]] = defaultdict(list)
    for _, layer in model.moe_layers():
        bank = layer.experts
        for part, stacks in expert_sets(bank).items():
            for matrix, matrices_EMN in stacks.items():
                for name, value in matrix_structure(matrices_EMN, matrix, ranks, removed_ranks, rank).items():
                    values[f"probe/{part}/{name}"].append(value)
                if part == "unique":
                    _, _, left_MK, right_NK = bank.parts(matrix)
                    values["probe/unique/leakage"].append(float(touching_share(matrices_EMN, left_MK, right_NK)))
                    complement_EMN = complement_part(matrices_EMN, left_MK, right_NK)
                    for (side, _), value in pair_overlaps(complement_EMN, [rank]).items():
                        values[f"probe/unique/complement_overlap_{side_name(matrix, side)}"].append(value)
    return {name: sum(items) / len(items) for name, items in values.items()}


class MechanismProbe(L.Callback):
    """Logs :func:`structure_metrics` every ``every_n_steps`` and, with SD-MoE, the refresh-cycle measurements.

    Single-process instrument for the evidence study: it reads the whole expert banks, so it is not meant
    for expert-parallel runs. Its measurements never touch the model's random streams or weights.

    Args:
        every_n_steps: optimizer steps between structure measurements.
        ranks: r values of the overlap-versus-rank curves.
        removed_ranks: k values of the residual overlaps.
        rank: r of the residual and complement overlaps (the monitors' r).
        refresh_cycles: measure around every ``refresh_cycles``-th basis refresh (1: all of them).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        ranks: list[int] | None = None,
        removed_ranks: list[int] | None = None,
        rank: int = 8,
        refresh_cycles: int = 1,
    ) -> None:
        if every_n_steps < 1 or refresh_cycles < 1:
            raise ValueError(f"every_n_steps={every_n_steps} and refresh_cycles={refresh_cycles} must be >= 1")
        self.every_n_steps = every_n_steps
        self.ranks = ranks or [4, 8, 16, 32]
        self.removed_ranks = removed_ranks or [8, 32]
        self.rank = rank
        self.refresh_cycles = refresh_cycles
        self._before_step: dict[tuple[int, str], Tensor] = {}
        self._raw_gradient_share: list[float] = []
        self._old_bases: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    def _banks(self, pl_module: L.LightningModule) -> list[tuple[int, DecoupledExpertBank]]:
        return [
            (index, layer.experts)
            for index, layer in pl_module.model.moe_layers()
            if isinstance(layer.experts, DecoupledExpertBank)
        ]

    def _phase(self, banks: list[tuple[int, DecoupledExpertBank]]) -> int | None:
        """Steps left until the next refresh (0: this step refreshes), for a monitored refresh cycle; else None."""
        if not banks:
            return None
        bank = banks[0][1]
        every = bank.config.refresh_every
        steps_after = bank.steps + 1
        cycle = -(-steps_after // every)
        if cycle % self.refresh_cycles:
            return None
        return -steps_after % every

    @torch.no_grad()
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 and trainer.is_global_zero:
            metrics = structure_metrics(pl_module.model, self.ranks, self.removed_ranks, self.rank)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=0)

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning runs callbacks before the module's hook: gradients are still unprojected here.
        banks = self._banks(pl_module)
        if self._phase(banks) != 1:
            return
        self._raw_gradient_share = []
        for index, bank in banks:
            for matrix in bank.decomposed:
                _, unique_EMN, left_MK, right_NK = bank.parts(matrix)
                self._before_step[index, matrix] = unique_EMN.detach().clone()
                if unique_EMN.grad is not None:
                    self._raw_gradient_share.append(float(touching_share(unique_EMN.grad, left_MK, right_NK)))

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics: dict[str, float] = {}
        banks = self._banks(pl_module)
        # `bank.steps` already counts the step that just finished.
        phase = None if not banks else -banks[0][1].steps % banks[0][1].config.refresh_every
        if banks and phase == 1 and self._before_step:
            metrics.update(self._pre_refresh(banks, trainer.optimizers[0]))
        if banks and phase == 0 and self._old_bases:
            metrics.update(self._post_refresh(banks))
        step = trainer.global_step
        if step % self.every_n_steps == 0:
            metrics.update(structure_metrics(pl_module.model, self.ranks, self.removed_ranks, self.rank))
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _pre_refresh(self, banks: list[tuple[int, DecoupledExpertBank]], optimizer: Any) -> dict[str, float]:
        shares: dict[str, list[float]] = defaultdict(list)
        for index, bank in banks:
            for matrix in bank.decomposed:
                _, unique_EMN, left_MK, right_NK = bank.parts(matrix)
                update_EMN = unique_EMN.detach() - self._before_step.pop((index, matrix))
                shares["update"].append(float(touching_share(update_EMN, left_MK, right_NK)))
                shares["leakage_pre_refresh"].append(float(touching_share(unique_EMN, left_MK, right_NK)))
                if unique_EMN.grad is not None:
                    shares["projected_gradient"].append(float(touching_share(unique_EMN.grad, left_MK, right_NK)))
                state = optimizer.state.get(unique_EMN, {})
                if "exp_avg" in state:
                    first_EMN, second_EMN = state["exp_avg"], state["exp_avg_sq"]
                    direction_EMN = first_EMN / (second_EMN.sqrt() + optimizer.defaults.get("eps", 1e-8))
                    shares["first_moment"].append(float(touching_share(first_EMN, left_MK, right_NK)))
                    shares["adam_direction"].append(float(touching_share(direction_EMN, left_MK, right_NK)))
                self._old_bases[index, matrix] = (left_MK.clone(), right_NK.clone())
        shares["raw_gradient"] = self._raw_gradient_share
        return {f"probe/refresh/{name}_share": sum(v) / len(v) for name, v in shares.items() if v}

    def _post_refresh(self, banks: list[tuple[int, DecoupledExpertBank]]) -> dict[str, float]:
        values: dict[str, list[float]] = defaultdict(list)
        for index, bank in banks:
            for matrix in bank.decomposed:
                common_MN, unique_EMN, left_MK, right_NK = bank.parts(matrix)
                old_left_MK, old_right_NK = self._old_bases.pop((index, matrix))
                values["leakage_post_refresh_share"].append(float(touching_share(unique_EMN, left_MK, right_NK)))
                rank = left_MK.shape[1]
                values["basis_kept_left"].append(float((old_left_MK.T @ left_MK).square().sum() / rank))
                values["basis_kept_right"].append(float((old_right_NK.T @ right_NK).square().sum() / rank))
                values["common_outside_share"].append(
                    1.0 - float(touching_share(common_MN.unsqueeze(0), left_MK, right_NK))
                )
        return {f"probe/refresh/{name}": sum(v) / len(v) for name, v in values.items()}
