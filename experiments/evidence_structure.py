"""How much structure the experts of a trained checkpoint share, and of what rank: a post-training stage.

For every MoE layer, matrix type and expert set (``proxy``: the weights tokens see; ``unique``: SD-MoE's W_u)
of a final checkpoint, with X̄ the mean of the E expert matrices:

- ``shared_energy_top{k}``: ``Σ_{j≤k} σ_j(X̄)² / mean_i ‖X_i‖²``, the share of an expert's energy that the top-k
  directions common to all experts carry (its limit, k = min(M, N), is the common-mode share);
- ``residual_overlap_k{k}_{side}``: the mean pairwise overlap ``sim(·, ·; r)`` of the experts after removing the
  top-k singular subspaces of X̄ from both sides (k = 0: the experts as they are).

- ``subspace_energy_top{k}`` and ``subspace_residual_overlap_k{k}_{side}``: the same with the top-k singular
  subspaces of the experts side by side ``[X_1 … X_E]`` (left) and stacked ``[X_1; …; X_E]`` (right) instead of
  X̄'s: the directions the experts use most, each with its own mixing (a shared subspace need not be a shared
  matrix: experts reading the same input directions through different hidden units have a small mean).
  ``subspace_energy`` is the share of the experts' energy touching those subspaces (a random matrix: about
  ``1 − (1 − k/M)(1 − k/N)``).

If the experts' overlap came from shared structure of rank at most k, the residual overlap would fall to the
chance level ``r / (m − k)`` once k directions are removed; how slowly it falls says how high the rank of
what they share is. Values are means over layers and matrix types; ``side`` is ``d`` (model width) or ``f``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from evidence_probe import complement_part, expert_sets, pair_overlaps, side_name, touching_share

from sdmoe_train.lightning.module import PretrainModule

REMOVED_RANKS = (0, 1, 2, 4, 8, 16, 32, 64)
"""k values of the residual-overlap and shared-energy curves."""


@torch.no_grad()
def stack_structure(matrices_EMN: torch.Tensor, matrix: str, rank: int) -> dict[str, float]:
    """Shared energy and residual overlap of one stack of expert matrices, for every k in ``REMOVED_RANKS``."""
    matrices_EMN = matrices_EMN.detach().double()
    mean_MN = matrices_EMN.mean(dim=0)
    energy = matrices_EMN.square().sum(dim=(-2, -1)).mean()
    left_MX, values_X, right_adjoint_XN = torch.linalg.svd(mean_MN, full_matrices=False)
    used_left_MX = torch.linalg.svd(matrices_EMN.transpose(0, 1).flatten(1), full_matrices=False).U
    used_right_NX = torch.linalg.svd(matrices_EMN.flatten(0, 1), full_matrices=False).Vh.T
    metrics = {}
    for k in REMOVED_RANKS:
        if k >= min(mean_MN.shape) - rank:
            continue
        metrics[f"shared_energy_top{k}"] = float(values_X[:k].square().sum() / energy)
        metrics[f"subspace_energy_top{k}"] = float(
            touching_share(matrices_EMN, used_left_MX[:, :k], used_right_NX[:, :k])
        )
        for prefix, left_MK, right_NK in (
            ("", left_MX[:, :k], right_adjoint_XN[:k].T),
            ("subspace_", used_left_MX[:, :k], used_right_NX[:, :k]),
        ):
            residual_EMN = complement_part(matrices_EMN, left_MK, right_NK)
            for (side, _), value in pair_overlaps(residual_EMN, [rank]).items():
                metrics[f"{prefix}residual_overlap_k{k}_{side_name(matrix, side)}"] = value
    return metrics


def shared_structure(checkpoints: dict[str, Path], rank: int = 8) -> dict[str, dict[str, float]]:
    """``structure/<part>/<metric>`` of every checkpoint (means over layers and matrix types).

    Args:
        checkpoints: run id -> final checkpoint.
        rank: r of the overlaps (the monitors' r).
    """
    results = {}
    for run_id, path in checkpoints.items():
        model = PretrainModule.load_from_checkpoint(path, map_location="cpu", weights_only=False).model
        values: dict[str, list[float]] = defaultdict(list)
        for _, layer in model.moe_layers():
            for part, stacks in expert_sets(layer.experts).items():
                for matrix, matrices_EMN in stacks.items():
                    for name, value in stack_structure(matrices_EMN, matrix, rank).items():
                        values[f"structure/{part}/{name}"].append(value)
        results[run_id] = {name: sum(items) / len(items) for name, items in values.items()}
    return results
