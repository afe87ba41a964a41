"""Routing health of the MoE layers: loads, balance, balancing losses and biases (docs/design/sdmoe.md §8)."""

# Shape key: L monitored layers, E experts.

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor

from sdmoe_train.lightning.callbacks.monitor import Figure, IntervalMonitor, layer_name
from sdmoe_train.lightning.contract import training_module
from sdmoe_train.models.transformer import MoEAux
from sdmoe_train.moe.diagnostics import load_health


class RoutingHealthMonitor(IntervalMonitor):
    """Token loads per expert over each interval, their balance, the balancing losses and the router biases.

    Counts come from the routing record ``PretrainModule.last_routing`` of each training micro-batch, that is
    from the forward outputs, so a forward recomputed by activation checkpointing is never counted twice. They
    accumulate on the device and are summed over all ranks once per interval. Under expert parallelism too:
    the router is replicated, so every rank counts the copies its own tokens send to each global expert id
    (before the all-to-all, not the rows its experts receive), and the sum over ranks counts every token once.

    Logged per monitored layer (``routing/<quantity>/layer_NN``) and as a mean over the monitored layers
    (``routing/<quantity>``): ``load_entropy`` (entropy / log E), ``load_cv`` (coefficient of variation),
    ``max_mean_load``, ``dead_expert_fraction``, ``token_copies`` (routed token copies in the interval, all
    ranks; tokens per expert = load fraction × this), the interval means of ``load_balance_loss``,
    ``seq_balance_loss`` and ``z_loss``, and ``bias_abs_mean`` (aux-loss-free balancing biases). With
    ``per_expert`` also ``routing/load_fraction/layer_NN/expert_EE`` and ``routing/bias/layer_NN/expert_EE``.
    Layers routed by SSMoE (``model.ssmoe``) add its diagnostics (docs/design/ssmoe.md §6) as
    ``routing/ssmoe_<quantity>/layer_NN``: ``row_cos_mean``, ``learned_cos_mean``, ``spectral_entropy`` and
    ``changed_share`` (the loads above already count SSMoE's final selection).
    Figures: the load fractions of each layer as a bar chart.

    Args:
        every_n_steps: optimizer steps per interval.
        layers: block indices to monitor (None: every MoE layer).
        per_expert: also log one scalar per expert and layer (E·L columns in a CSV log).
    """

    def __init__(self, every_n_steps: int = 50, layers: list[int] | None = None, per_expert: bool = True) -> None:
        super().__init__(every_n_steps, layers)
        self.per_expert = per_expert
        self._counts_LE: Tensor | None = None
        self._loss_sums: dict[str, Tensor] = {}
        self._micro_batches = 0
        self._last_record: object | None = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._accumulate(training_module(pl_module, type(self).__name__).last_routing)
        if self.interval_completed(trainer):
            self._publish_interval(trainer)

    def _accumulate(self, record: MoEAux | None) -> None:
        if record is None or record is self._last_record:
            return
        self._last_record = record
        rows = [record.layer_indices.index(index) for index, _ in self.monitored]
        counts_LE = record.tokens_per_expert_LE[rows]
        # A window restored from a checkpoint may sit on another device than this run's model.
        self._counts_LE = counts_LE if self._counts_LE is None else self._counts_LE.to(counts_LE.device) + counts_LE
        losses = {
            "load_balance_loss": record.load_balance_loss_L[rows],
            "seq_balance_loss": record.sequence_balance_loss_L[rows],
            "z_loss": record.z_loss_L[rows],
        }
        for name, values_L in losses.items():
            previous = self._loss_sums.get(name)
            self._loss_sums[name] = values_L.float() if previous is None else previous.to(values_L.device) + values_L
        self._micro_batches += 1

    def _publish_interval(self, trainer: L.Trainer) -> None:
        if self._counts_LE is None:
            return
        scalars, figures = self.measure(trainer.strategy)
        self.publish(trainer, scalars, figures)
        self._counts_LE, self._loss_sums, self._micro_batches = None, {}, 0

    @torch.no_grad()
    def measure(self, strategy: Strategy) -> tuple[dict[str, Tensor], list[Figure]]:
        """Statistics of the interval's counts and losses, summed (counts) or averaged (losses) over all ranks.

        Collective: every rank calls ``strategy.reduce`` in the same order.
        """
        counts_LE = strategy.reduce(self._counts_LE, reduce_op="sum")
        health = load_health(counts_LE)
        per_layer: dict[str, Tensor] = {**health.named(), "token_copies": counts_LE.sum(dim=-1).float()}
        for name, sums_L in self._loss_sums.items():
            per_layer[name] = strategy.reduce(sums_L / self._micro_batches, reduce_op="mean")
        biases_LE = torch.stack([layer.router.selection_bias.float() for _, layer in self.monitored])
        per_layer["bias_abs_mean"] = biases_LE.abs().mean(dim=-1)
        scalars: dict[str, Tensor] = {}
        for name, values_L in per_layer.items():
            scalars[f"routing/{name}"] = values_L.mean()
            for (index, _), value in zip(self.monitored, values_L, strict=True):
                scalars[f"routing/{name}/{layer_name(index)}"] = value
        for index, layer in self.monitored:
            for name, value in layer.router.diagnostics().items():
                scalars[f"routing/ssmoe_{name}/{layer_name(index)}"] = value
        figures = []
        for row, (index, _) in enumerate(self.monitored):
            figures.append(
                Figure(
                    f"routing/load_fraction/{layer_name(index)}",
                    health.load_fraction_LE[row],
                    "expert",
                    "load fraction",
                )
            )
            if self.per_expert:
                for expert in range(counts_LE.shape[-1]):
                    suffix = f"{layer_name(index)}/expert_{expert:02d}"
                    scalars[f"routing/load_fraction/{suffix}"] = health.load_fraction_LE[row, expert]
                    scalars[f"routing/bias/{suffix}"] = biases_LE[row, expert]
        return scalars, figures

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "counts_LE": self._counts_LE,
            "loss_sums": dict(self._loss_sums),
            "micro_batches": self._micro_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._counts_LE = state_dict["counts_LE"]
        self._loss_sums = dict(state_dict["loss_sums"])
        self._micro_batches = state_dict["micro_batches"]
