"""What every specialisation-monitoring callback shares: interval, layer subset, logging and figures.

A monitor computes its statistics every ``every_n_steps`` optimizer steps and publishes them at once:

- scalars go to every logger of the Trainer (CSV, TensorBoard, W&B) through ``logger.log_metrics`` at
  ``step = trainer.global_step`` (optimizer steps done). ``LightningModule.log`` is not used because it
  writes only on multiples of ``log_every_n_steps`` and would drop an interval that falls in between;
- figures (E×E similarity heatmaps, load bars) are appended to ``<log_dir>/monitor/figures.jsonl``, the
  source of ``sdmoe-train report``, and, when a ``WandbLogger`` is attached, logged to W&B as SVG panels.

Distributed runs: every rank runs the same hooks at the same optimizer steps, so a collective a monitor
issues (a reduction of routing counts, the probe-batch broadcast) is reached by all ranks alike, in the same
order; model weights and all-reduced gradients are identical on every rank, so statistics computed from
them need no communication. Under expert parallelism each rank holds only its slice of the experts: the
monitors then compute per-expert factors (top-r bases, Gram matrices, scalars) locally and combine them over
the expert-parallel group with :mod:`sdmoe_train.parallel.monitoring`, so every statistic covers all E
experts. Only global rank 0 writes, and the device-to-host copy of the scalars happens once per interval,
never between intervals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.contract import training_module
from sdmoe_train.moe.layer import MoELayer
from sdmoe_train.report.figures import FIGURES_FILE, Figure, append_figures
from sdmoe_train.report.svg import bars_svg, heatmap_svg


def layer_name(index: int) -> str:
    """``layer_03`` for block 3: the metric-name suffix of per-layer values."""
    return f"layer_{index:02d}"


class IntervalMonitor(L.Callback):
    """Base of the monitoring callbacks: schedule, layer selection, state and publishing.

    Args:
        every_n_steps: optimizer steps between two publications.
        layers: block indices of the MoE layers to monitor; None monitors every MoE layer.
    """

    def __init__(self, every_n_steps: int, layers: list[int] | None = None) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"{type(self).__name__}.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.layers = None if layers is None else list(layers)
        self._monitored: list[tuple[int, MoELayer]] = []
        self._published_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        name = type(self).__name__
        moe_layers = dict(training_module(pl_module, name).model.moe_layers())
        if not moe_layers:
            raise ConfigError(f"{name} monitors MoE layers, but model.arch.moe is null (every layer is dense)")
        chosen = list(moe_layers) if self.layers is None else self.layers
        unknown = [index for index in chosen if index not in moe_layers]
        if unknown or not chosen:
            raise ConfigError(
                f"{name}.layers={self.layers} must name MoE blocks; {unknown or 'none'} are not. "
                f"MoE blocks of this model: {list(moe_layers)} (or leave layers unset for all)"
            )
        self._monitored = [(index, moe_layers[index]) for index in chosen]

    @property
    def monitored(self) -> list[tuple[int, MoELayer]]:
        """(block index, layer) of every monitored MoE layer, in depth order of the selection."""
        return self._monitored

    def interval_completed(self, trainer: L.Trainer) -> bool:
        """True once per optimizer step that ends an interval (host-side counters only)."""
        step = trainer.global_step
        return step > 0 and step % self.every_n_steps == 0 and step != self._published_step

    def publish(self, trainer: L.Trainer, scalars: dict[str, Tensor | float], figures: list[Figure]) -> None:
        """Log the scalars to every logger and record the figures, from global rank 0.

        Args:
            trainer: the running Trainer.
            scalars: metric name -> 0-dim tensor or float (tensors reach the host here, in one copy).
            figures: matrices and vectors for heatmaps and bar charts.
        """
        step = trainer.global_step
        self._published_step = step
        device = next((value.device for value in scalars.values() if isinstance(value, Tensor)), None)
        values = torch.stack(
            [torch.as_tensor(value, device=device).detach().float().reshape(()) for value in scalars.values()]
        ).tolist()
        metrics = dict(zip(scalars, values, strict=True))
        # `Trainer.log_dir` broadcasts rank 0's answer: every rank must ask, or rank 0 waits forever.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if figures:
            figures = [Figure(f.name, f.values.detach().float().cpu(), f.row_label, f.column_label) for f in figures]
            append_figures(log_dir / FIGURES_FILE, step, figures)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    _log_wandb_figures(logger, step, figures)

    def state_dict(self) -> dict[str, Any]:
        return {"published_step": self._published_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._published_step = state_dict["published_step"]


def _log_wandb_figures(logger: WandbLogger, step: int, figures: list[Figure]) -> None:
    """Heatmaps and bar charts as W&B HTML panels (inline SVG: no image library needed, works offline)."""
    import wandb  # only runs with a WandbLogger get here; importing wandb takes seconds

    media = {}
    for figure in figures:
        values = figure.values.tolist()
        if figure.values.dim() == 2:
            svg = heatmap_svg(values, figure.name, figure.row_label, figure.column_label)
        else:
            svg = bars_svg(values, figure.name, figure.row_label, figure.column_label)
        media[f"{figure.name.split('/')[0]}_figures/{figure.name.split('/', 1)[1]}"] = wandb.Html(svg, inject=False)
    logger.experiment.log({**media, "trainer/global_step": step})
