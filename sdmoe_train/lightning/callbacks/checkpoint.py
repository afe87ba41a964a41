"""Checkpoints every N optimizer steps plus a final ``last.ckpt`` however training ends."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final step.

    Lightning 2.6 writes ``last.ckpt`` at train end only if no checkpoint was ever saved, so a run whose
    ``max_steps`` is not a multiple of ``every_n_train_steps`` would lose the steps after the last
    periodic save. This subclass also saves at train end whenever the newest step is not on disk yet.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
