"""Checks of the recipe's ``trainer`` section that Lightning leaves to the first training step.

Lightning validates most ``Trainer`` arguments when it is built (those errors are reported as bad input by
:mod:`.fit`), but not these: ``accumulate_grad_batches: 0`` or ``val_check_interval: 0`` end in a
``ZeroDivisionError`` inside the training loop, a negative ``gradient_clip_val`` silently flips the sign of
every gradient (``clip_grad_norm_`` scales by ``max_norm / norm``), and a logger folder that cannot be
written fails only after the model and data are built.
"""

from __future__ import annotations

import math
from typing import Any

from sdmoe_train.cli.outputs import check_creatable_directory
from sdmoe_train.errors import ConfigError


def check_trainer_settings(trainer: Any) -> None:
    """Refuses trainer settings that Lightning accepts but that fail or misbehave once training runs.

    Args:
        trainer: the parsed ``trainer`` section (attribute access, as LightningCLI's namespace).

    Raises:
        ConfigError: Naming the first bad setting, its value and what would work.
    """
    accumulate = trainer.accumulate_grad_batches
    if accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={accumulate} must be >= 1 (1: no gradient accumulation)")
    clip = trainer.gradient_clip_val
    if clip is not None and not (math.isfinite(clip) and clip >= 0):
        raise ConfigError(
            f"trainer.gradient_clip_val={clip} must be a finite number >= 0 (the largest gradient norm; null or 0: "
            "no clipping)"
        )
    interval = trainer.val_check_interval
    if isinstance(interval, int | float) and not isinstance(interval, bool) and interval == 0:
        raise ConfigError(
            "trainer.val_check_interval=0 would validate after every 0 steps; give a step count >= 1, or a share of "
            "an epoch in (0, 1]"
        )
    every_epochs = trainer.check_val_every_n_epoch
    if every_epochs is not None and every_epochs < 1:
        raise ConfigError(f"trainer.check_val_every_n_epoch={every_epochs} must be >= 1, or null (validate by steps)")
    for name, lowest in (("log_every_n_steps", 0), ("min_steps", 0), ("num_sanity_val_steps", -1)):
        value = getattr(trainer, name)
        if value is not None and value < lowest:
            raise ConfigError(f"trainer.{name}={value} must be >= {lowest}")


def check_logger_folders(trainer: Any) -> None:
    """Checks that every configured logger's ``save_dir`` can be written (after the run paths are derived).

    Raises:
        ConfigError: Naming the logger's class and folder.
    """
    loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
    for logger in loggers:
        init_args = getattr(logger, "init_args", None)
        save_dir = init_args.get("save_dir") if init_args is not None else None
        if save_dir:
            check_creatable_directory(save_dir, f"trainer.logger {logger.class_path.rsplit('.', 1)[-1]} save_dir")
