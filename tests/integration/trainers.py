"""Quiet single-process or multi-process CPU Trainers for tests and the scripts they launch."""

from __future__ import annotations

from pathlib import Path

import lightning as L

QUIET_CPU = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
"""A CPU Trainer without logger, checkpoints, progress bar or model summary."""


def quiet_cpu_trainer(**settings: object) -> L.Trainer:
    """A Trainer of :data:`QUIET_CPU` settings, each of which ``settings`` may override."""
    return L.Trainer(**(QUIET_CPU | settings))


def cpu_trainer(tmp_path: Path, max_steps: int, **settings: object) -> L.Trainer:
    """A quiet CPU Trainer logging every step to ``tmp_path/metrics.csv``."""
    return quiet_cpu_trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        **settings,
    )
