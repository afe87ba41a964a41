"""W&B run-id persistence: a requeued or resumed run logs to the same W&B run as the job that started it."""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

from sdmoe_train.io import write_text_atomically

WANDB_RUN_ID_FILE = "wandb_run_id"
"""File in the run directory holding the W&B run id, so that a requeued or resumed run logs to the same run."""


def persist_wandb_run_id(trainer_config: Any) -> None:
    """Gives a ``WandbLogger`` without an ``id`` the run id stored in the run directory (created once).

    Args:
        trainer_config: the parsed ``trainer`` section of a recipe (its ``logger`` and ``default_root_dir``).
    """
    loggers = trainer_config.logger if isinstance(trainer_config.logger, list) else [trainer_config.logger]
    for logger in loggers:
        class_path = getattr(logger, "class_path", None)
        if not isinstance(class_path, str) or not class_path.endswith("WandbLogger"):
            continue
        init_args = logger.init_args
        if init_args.get("id") or init_args.get("version"):
            continue
        run_dir = Path(trainer_config.default_root_dir or init_args.get("save_dir") or ".")
        id_file = run_dir / WANDB_RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            # W&B's own id format: 8 lowercase letters and digits.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_text_atomically(id_file, run_id + "\n")
        init_args["id"] = run_id
