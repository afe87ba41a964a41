"""Alignment of router rows with the dominant directions of each MoE layer's input space (docs/design/sdmoe.md §8)."""

# Shape key: B sequences, S tokens, T = B·S tokens, D model width, E experts, L experts on this rank, F expert
# width, K directions.

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks.monitor import Figure, IntervalMonitor, layer_name
from sdmoe_train.lightning.contract import training_module
from sdmoe_train.moe.diagnostics import (
    gate_alignment,
    row_gram,
    top_direction_share,
    top_gram_eigenvectors,
    top_right_singular_vectors,
)
from sdmoe_train.parallel.groups import ExpertParallelGroups
from sdmoe_train.parallel.monitoring import sum_over_experts


class GateAlignmentMonitor(IntervalMonitor):
    """``|cos(g_e, v_t)|`` of every router row g_e against the top-K right singular vectors v_t of

    - ``hidden``: the normalised hidden states entering the layer on a fixed probe batch, and
    - ``experts``: the expert input matrices (gate and up proxies of all experts stacked, (2·E·F, D)), whose
      top right singular vectors are the top eigenvectors of their (D, D) Gram matrix ``Σ_i W_iᵀ W_i``:
      under expert parallelism each rank sums its experts' Gram matrices and the group all-reduces that sum.

    The probe is the first ``probe_sequences`` sequences of the first training batch, broadcast from rank 0 so
    that every rank measures the same thing, and kept in the checkpoint. It runs through the bare model
    (no DDP wrapper, no gradient, not counted in routing statistics). Logged per source and layer:
    ``gate/<source>_top1_share/layer_NN`` (mean over experts of the share of ``Σ_t cos²`` captured by t = 1),
    ``gate/<source>_top1_cos/layer_NN`` (mean ``|cos|`` with the top direction) and
    ``gate/<source>_captured/layer_NN`` (mean ``Σ_t cos²``: share of the row inside the top-K subspace), and
    their means over layers ``gate/<source>_<quantity>``. Figures: the E×K cosines per (source, layer).

    Args:
        every_n_steps: optimizer steps between measurements.
        layers: block indices to monitor (None: every MoE layer).
        directions: K, the number of top singular directions.
        probe_sequences: sequences of the probe batch (at most the per-rank batch size).
    """

    def __init__(
        self, every_n_steps: int = 100, layers: list[int] | None = None, directions: int = 8, probe_sequences: int = 4
    ) -> None:
        super().__init__(every_n_steps, layers)
        if directions < 1:
            raise ConfigError(f"GateAlignmentMonitor.directions={directions} must be >= 1")
        if probe_sequences < 1:
            raise ConfigError(f"GateAlignmentMonitor.probe_sequences={probe_sequences} must be >= 1")
        self.directions = directions
        self.probe_sequences = probe_sequences
        self._probe_BS: Tensor | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        hidden_dim = training_module(pl_module, type(self).__name__).model.config.hidden_dim
        if self.directions > hidden_dim:
            raise ConfigError(
                f"GateAlignmentMonitor.directions={self.directions} must not exceed the model width {hidden_dim}"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._probe_BS is None:
            # Training batches hold seq_len + 1 tokens (inputs and shifted targets); the model sees the inputs.
            probe_BS = batch[: self.probe_sequences, :-1].clone()
            self._probe_BS = trainer.strategy.broadcast(probe_BS, src=0)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.interval_completed(trainer) and self._probe_BS is not None:
            module = training_module(pl_module, type(self).__name__)
            scalars, figures = self.measure(module.model, module.expert_groups)
            self.publish(trainer, scalars, figures)

    @torch.no_grad()
    def measure(
        self, model: torch.nn.Module, groups: ExpertParallelGroups | None = None
    ) -> tuple[dict[str, Tensor], list[Figure]]:
        """Alignment statistics of the current router rows against probe hidden states and expert inputs.

        Args:
            model: the bare model (its forward on the probe batch is collective under expert parallelism).
            groups: the expert-parallel layout (None: this rank holds every expert); with expert parallelism
                a collective over the expert-parallel group.
        """
        hidden = self._probe_hidden_states(model)
        scalars: dict[str, Tensor] = {}
        figures: list[Figure] = []
        summaries: dict[str, list[Tensor]] = {}
        for index, layer in self.monitored:
            gate_LFD, up_LFD = (layer.experts.applied_weight(matrix) for matrix in ("gate", "up"))
            local_gram_DD = row_gram(torch.cat((gate_LFD, up_LFD), dim=1).flatten(0, 1))
            directions = {
                "hidden": top_right_singular_vectors(hidden[index], self.directions),
                "experts": top_gram_eigenvectors(sum_over_experts(local_gram_DD, groups), self.directions),
            }
            for source, directions_DK in directions.items():
                cosines_EK = gate_alignment(layer.router.weight, directions_DK)
                quantities = {
                    "top1_share": top_direction_share(cosines_EK).mean(),
                    "top1_cos": cosines_EK[:, 0].mean(),
                    "captured": cosines_EK.square().sum(dim=-1).mean(),
                }
                for quantity, value in quantities.items():
                    scalars[f"gate/{source}_{quantity}/{layer_name(index)}"] = value
                    summaries.setdefault(f"gate/{source}_{quantity}", []).append(value)
                figures.append(
                    Figure(f"gate/{source}_alignment/{layer_name(index)}", cosines_EK, "expert", "direction")
                )
        scalars.update({name: torch.stack(values).mean() for name, values in summaries.items()})
        return scalars, figures

    def _probe_hidden_states(self, model: torch.nn.Module) -> dict[int, Tensor]:
        """The (T, D) input of every monitored MoE layer on the probe batch."""
        captured: dict[int, Tensor] = {}
        handles = [
            layer.register_forward_pre_hook(
                lambda module, args, index=index: captured.__setitem__(index, args[0].flatten(0, -2))
            )
            for index, layer in self.monitored
        ]
        try:
            probe_BS = self._probe_BS.to(next(model.parameters()).device)
            model(probe_BS)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "probe_BS": self._probe_BS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._probe_BS = state_dict["probe_BS"]
