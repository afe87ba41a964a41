"""One run, one directory: ``trainer.default_root_dir`` is the run directory, and everything a run writes follows it.

Filled into a parsed recipe before anything is built (:func:`derive_run_paths`):

- a :class:`~sdmoe_train.checkpointing.periodic.PeriodicCheckpoint` without ``dirpath`` saves to
  ``<run_dir>/checkpoints``;
- without a configured logger, a ``CSVLogger`` writes ``<run_dir>/logs/version_N/metrics.csv``, a new
  ``version_N`` for every attempt (start, resume, requeue), so no attempt overwrites another's metrics
  (``sdmoe-train report`` joins them); a ``WandbLogger`` without ``save_dir`` writes under the run directory;
- the W&B run id (:mod:`~sdmoe_train.checkpointing.wandb_run_id`) and the run lock
  (:mod:`~sdmoe_train.checkpointing.run_lock`) live in the run directory itself.

So ``--trainer.default_root_dir=elsewhere`` moves the whole run. Paths a recipe spells out explicitly are
kept as written.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

from sdmoe_train.errors import ConfigError

CHECKPOINTS_SUBDIR = "checkpoints"
"""Checkpoint folder inside the run directory."""
LOGS_SUBDIR = "logs"
"""Logger folder inside the run directory (the CSV logger's ``name``)."""
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
METRICS_FILE = "metrics.csv"


def run_directory(trainer_config: Any) -> Path:
    """The run directory of a parsed ``trainer`` section: ``default_root_dir``, else the working directory."""
    return Path(trainer_config.default_root_dir or os.getcwd())


def derive_run_paths(trainer_config: Any) -> Path:
    """Points the checkpoint folder and the loggers of a parsed ``trainer`` section into the run directory.

    Returns:
        The run directory (now also ``trainer_config.default_root_dir``).

    Raises:
        ConfigError: A ``CSVLogger`` with a fixed ``version`` would overwrite an earlier attempt's metrics.
    """
    run_dir = run_directory(trainer_config)
    trainer_config.default_root_dir = str(run_dir)
    if trainer_config.logger is None or trainer_config.logger is True:
        trainer_config.logger = Namespace(
            class_path=CSV_LOGGER, init_args=Namespace(save_dir=str(run_dir), name=LOGS_SUBDIR, version=None)
        )
    loggers = trainer_config.logger if isinstance(trainer_config.logger, list) else [trainer_config.logger]
    for logger in loggers:
        class_path = getattr(logger, "class_path", None)
        if not isinstance(class_path, str):
            continue
        init_args = logger.init_args
        if class_path.endswith("WandbLogger") and init_args.get("save_dir") in (None, "."):
            init_args["save_dir"] = str(run_dir)
        if class_path.endswith("CSVLogger"):
            _refuse_overwriting_metrics(init_args)
    for callback in trainer_config.callbacks or []:
        class_path = getattr(callback, "class_path", None)
        unset = isinstance(class_path, str) and callback.init_args.get("dirpath") is None
        if unset and class_path.endswith("PeriodicCheckpoint"):
            callback.init_args["dirpath"] = str(run_dir / CHECKPOINTS_SUBDIR)
    return run_dir


def check_writable(folder: str | Path, setting: str) -> None:
    """Creates ``folder`` if needed and makes sure files can be written in it, so a save does not fail hours later.

    Raises:
        ConfigError: Naming the folder and the setting it comes from.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"cannot write to {str(folder)!r} ({setting}): {error.strerror}; make it writable for this user or "
            "choose another folder"
        ) from error


def _refuse_overwriting_metrics(init_args: Any) -> None:
    # Lightning's CSV writer deletes the metrics file of its folder when it starts: a fixed version that
    # already holds one would lose every earlier attempt's metrics.
    version = init_args.get("version")
    if version is None:
        return
    folder = Path(init_args.get("save_dir") or ".") / (init_args.get("name") or "") / str(version)
    if (folder / METRICS_FILE).is_file():
        raise ConfigError(
            f"trainer.logger CSVLogger version={version!r} would overwrite {folder / METRICS_FILE}, the metrics of an "
            "earlier attempt of this run; remove `version` (and `save_dir`) from the logger so that each attempt "
            "logs to its own <run_dir>/logs/version_N folder, which `sdmoe-train report` joins"
        )
