"""Parameter spectral overlap between the routed experts of each MoE layer (docs/design/sdmoe.md §8, our definition)."""

# Shape key: E experts, L experts on this rank, M matrix rows (out), N matrix columns (in), R diagnostic rank.

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks.monitor import Figure, IntervalMonitor, layer_name
from sdmoe_train.lightning.contract import training_module
from sdmoe_train.moe.diagnostics import SVDMethod, off_diagonal_mean_max, subspace_similarity
from sdmoe_train.moe.experts import MATRIX_TYPES, ExpertBank, MatrixType
from sdmoe_train.parallel.groups import ExpertParallelGroups
from sdmoe_train.parallel.monitoring import expert_subspaces

SIDES = ("left", "right")


def check_svd_method(monitor: str, svd: str) -> SVDMethod:
    """The method, or ConfigError naming the valid ones."""
    if svd not in ("lowrank", "full"):
        raise ConfigError(f"{monitor}.svd={svd!r} must be 'lowrank' or 'full'")
    return svd  # type: ignore[return-value]


def expert_matrices(bank: ExpertBank, matrix: MatrixType) -> dict[str, Tensor]:
    """(L, M, N) stacks of this rank's experts, one matrix type: ``proxy`` always, ``unique`` if SD-MoE splits it."""
    parts = {"proxy": bank.applied_weight(matrix)}
    unique_LMN = bank.unique_part(matrix)
    if unique_LMN is not None:
        parts["unique"] = unique_LMN
    return parts


class SpectralOverlapMonitor(IntervalMonitor):
    """E×E similarity ``sim(W[i], W[j]; r)`` of the experts' top-r singular subspaces, on both sides.

    For every monitored layer and matrix type it compares the proxies ``W[i]`` (the weights tokens see) and,
    with SD-MoE, the unique parts ``W_u[i]``; one batched fp32 SVD per (layer, type, part). Logged:
    ``spectral/<part>_<type>_<side>_overlap_{mean,max}/layer_NN`` (mean and max over expert pairs) and the
    mean over layers, types and sides ``spectral/<part>_overlap_{mean,max}``. Random r-dimensional subspaces
    of R^m give about r/m. Figures: the side-averaged E×E matrix per (part, type, layer). Under expert
    parallelism each rank factorises its own experts and the bases are all-gathered (``E·r·(M + N)`` values
    per stack), so the matrices cover all E experts.

    Args:
        every_n_steps: optimizer steps between measurements.
        layers: block indices to monitor (None: every MoE layer).
        rank: r, the subspace dimension (the SD-MoE common rank k is the natural choice).
        matrices: expert matrix types to measure.
        svd: ``lowrank`` (batched randomised SVD, fixed seed) or ``full`` (batched ``torch.linalg.svd``, many
            times the cost on large experts; benchmarks/README.md); see
            :func:`~sdmoe_train.moe.diagnostics.top_singular_subspaces`.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        layers: list[int] | None = None,
        rank: int = 8,
        matrices: list[MatrixType] | None = None,
        svd: SVDMethod = "lowrank",
    ) -> None:
        super().__init__(every_n_steps, layers)
        self.rank = rank
        self.svd = check_svd_method(type(self).__name__, svd)
        self.matrices: list[MatrixType] = list(MATRIX_TYPES) if matrices is None else list(matrices)
        unknown = [matrix for matrix in self.matrices if matrix not in MATRIX_TYPES]
        if unknown or not self.matrices:
            raise ConfigError(
                f"SpectralOverlapMonitor.matrices={self.matrices} must be a non-empty subset of {list(MATRIX_TYPES)}"
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        check_rank(type(self).__name__, self.rank, self.monitored[0][1].experts, self.matrices)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval_completed(trainer):
            scalars, figures = self.measure(training_module(pl_module, type(self).__name__).expert_groups)
            self.publish(trainer, scalars, figures)

    @torch.no_grad()
    def measure(self, groups: ExpertParallelGroups | None = None) -> tuple[dict[str, Tensor], list[Figure]]:
        """Similarity statistics and matrices of the current weights of all E experts.

        Args:
            groups: the expert-parallel layout (None: this rank holds every expert); with expert parallelism
                a collective over the expert-parallel group.
        """
        scalars: dict[str, Tensor] = {}
        figures: list[Figure] = []
        summaries: dict[str, list[Tensor]] = {}
        for index, layer in self.monitored:
            for matrix in self.matrices:
                for part, weights_LMN in expert_matrices(layer.experts, matrix).items():
                    similarities_EE = side_similarities(weights_LMN, self.rank, self.svd, groups)
                    similarities = dict(zip(SIDES, similarities_EE, strict=True))
                    for side, similarity_EE in similarities.items():
                        metric = f"spectral/{part}_{matrix}_{side}_overlap"
                        add_pair_statistics(
                            scalars, summaries, similarity_EE, metric, index, f"spectral/{part}_overlap"
                        )
                    average_EE = (similarities["left"] + similarities["right"]) / 2
                    figures.append(
                        Figure(f"spectral/{part}_{matrix}/{layer_name(index)}", average_EE, "expert", "expert")
                    )
        scalars.update({name: torch.stack(values).mean() for name, values in summaries.items()})
        return scalars, figures


def add_pair_statistics(
    scalars: dict[str, Tensor],
    summaries: dict[str, list[Tensor]],
    similarity_EE: Tensor,
    metric: str,
    layer_index: int,
    summary: str,
) -> None:
    """Record the mean and max over expert pairs as ``{metric}_{mean,max}/layer_NN`` and for ``{summary}_*``."""
    mean, largest = off_diagonal_mean_max(similarity_EE)
    scalars[f"{metric}_mean/{layer_name(layer_index)}"] = mean
    scalars[f"{metric}_max/{layer_name(layer_index)}"] = largest
    summaries.setdefault(f"{summary}_mean", []).append(mean)
    summaries.setdefault(f"{summary}_max", []).append(largest)


def side_similarities(
    matrices_LMN: Tensor, rank: int, svd: SVDMethod, groups: ExpertParallelGroups | None = None
) -> tuple[Tensor, Tensor]:
    """E×E ``sim`` of the left and of the right top-r singular subspaces of all experts' matrices.

    One batched SVD of this rank's L experts; under expert parallelism the bases are then all-gathered.
    """
    left_EMR, right_ENR = expert_subspaces(matrices_LMN, rank, svd, groups)
    return subspace_similarity(left_EMR), subspace_similarity(right_ENR)


def check_rank(monitor: str, rank: int, bank: ExpertBank, matrices: list[MatrixType]) -> None:
    """Raise ConfigError unless ``rank`` is in [1, min(out, in)) of every measured expert matrix."""
    smallest = min(min(bank.applied_weight(matrix).shape[1:]) for matrix in matrices)
    if not 1 <= rank < smallest:
        raise ConfigError(
            f"{monitor}.rank={rank} must lie in [1, {smallest - 1}]: below the smaller side of every measured "
            "expert matrix, or every subspace would be the whole space"
        )
