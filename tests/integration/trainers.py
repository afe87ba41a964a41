"""A quiet single-process CPU Trainer for integration tests that drive ``PretrainModule`` directly."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def cpu_trainer(tmp_path: Path, max_steps: int, **kwargs: object) -> L.Trainer:
    """CPU Trainer logging every step to ``tmp_path/metrics.csv``, without checkpoints, bars or summaries."""
    return L.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        max_steps=max_steps,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
