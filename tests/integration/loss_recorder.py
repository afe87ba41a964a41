"""A test-only callback that appends each rank's per-step training loss, bit-exact, to a text file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L


class LossRecorder(L.Callback):
    """Writes ``STEP LOSS_AS_FLOAT_HEX`` per optimizer step to ``directory/losses_rank{R}.txt``, fsynced,
    so a process killed with SIGKILL leaves every step it finished on disk."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        loss = float(outputs["loss"].detach())
        with open(self.directory / f"losses_rank{trainer.global_rank}.txt", "a") as handle:
            handle.write(f"{trainer.global_step} {loss.hex()}\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_losses(path: Path) -> list[tuple[int, str]]:
    """(step, loss hex) lines of a recorder file, in the order written."""
    if not path.is_file():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(step), loss) for step, loss in rows]
