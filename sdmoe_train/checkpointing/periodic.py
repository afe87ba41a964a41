"""Crash-safe periodic checkpoints: atomic publish, manifest with hashes, keep-last-K, per-rank RNG states.

A save goes to a hidden ``.NAME.partial`` sibling (a file, or a directory of shards under a sharded
strategy), is fsynced and renamed into place on rank 0, and only then recorded in ``manifest.json``
(:mod:`sdmoe_train.checkpointing.manifest`) and older checkpoints pruned. A SIGKILL at any point therefore
leaves every previously listed checkpoint intact, and auto-resume (``sdmoe-train fit`` with
``--auto_resume true``, the default) picks the newest one that verifies.

Lightning already stores the model, optimizer, schedulers, loops, the data module's position and the
state of every stateful callback; this callback adds the RNG states of all ranks (Python, NumPy,
torch CPU and CUDA), restored on each rank right before the first resumed step.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from sdmoe_train.checkpointing.manifest import record_checkpoint, remove_stale_partials
from sdmoe_train.errors import ConfigError
from sdmoe_train.io import publish
from sdmoe_train.parallel.gather import all_gather_objects

log = logging.getLogger(__name__)

RNG_STATES_KEY = "rng_states"
"""Checkpoint entry holding one RNG state record per rank."""


class PeriodicCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that writes atomically, keeps a manifest and the newest K checkpoints.

    ``last.ckpt`` (``save_last: true``) always holds the final step: Lightning 2.6 writes it at train
    end only if no checkpoint was ever saved, so this subclass also saves at train end whenever the
    newest step is not on disk yet.

    Args:
        keep_last_k: Keep the newest K step checkpoints and delete older ones after each save (None
            keeps all). Replaces ``save_top_k``, which ranks by a monitored metric.
        hash_files: Record the SHA-256 of every checkpoint file in the manifest, verified on resume.
            Hashing reads each checkpoint once more; turn off for very large checkpoints to record and
            verify sizes only.
        **kwargs: ``ModelCheckpoint`` arguments (``dirpath``, ``every_n_train_steps``, ``save_last``, ...).
    """

    def __init__(self, keep_last_k: int | None = None, hash_files: bool = True, **kwargs: Any) -> None:
        if keep_last_k is not None and keep_last_k < 1:
            raise ConfigError(f"PeriodicCheckpoint keep_last_k={keep_last_k} must be >= 1 (or null to keep all)")
        if keep_last_k is not None and kwargs.get("monitor") is not None:
            raise ConfigError(
                f"PeriodicCheckpoint keep_last_k={keep_last_k} with monitor={kwargs['monitor']!r}: keep the newest "
                "checkpoints (keep_last_k) or the best by a metric (monitor + save_top_k), not both"
            )
        if kwargs.get("monitor") is None:
            # Without a metric every periodic checkpoint is kept by Lightning; keep_last_k prunes instead.
            kwargs["save_top_k"] = -1
        super().__init__(**kwargs)
        self.keep_last_k = keep_last_k
        self.hash_files = hash_files
        self._restored_rng_states: list[dict[str, Any]] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None and Path(self.dirpath).is_dir():
            remove_stale_partials(self.dirpath)

    def save_now(self, trainer: L.Trainer) -> None:
        """Saves the current step now (all ranks must call this), unless it is already on disk."""
        if trainer.global_step == self._last_global_step_saved:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        final = Path(filepath)
        staging = final.with_name(f".{final.name}.partial")
        trainer.save_checkpoint(staging, self.save_weights_only)
        if trainer.is_global_zero:
            publish(staging, final)
            removed = record_checkpoint(
                final, trainer.global_step, with_hashes=self.hash_files, keep_last_k=self.keep_last_k
            )
            for path in removed:
                self.best_k_models.pop(str(path), None)
        # No rank may read (or resume from) the checkpoint before it is in place.
        trainer.strategy.barrier("PeriodicCheckpoint.published")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning builds the checkpoint on every rank but writes rank 0's, so gather every rank's state.
        checkpoint[RNG_STATES_KEY] = all_gather_objects(trainer, _rng_state())

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored_rng_states = checkpoint.get(RNG_STATES_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states = self._restored_rng_states
        self._restored_rng_states = None
        if not states:
            return
        if len(states) != trainer.world_size:
            log.warning(
                "the checkpoint holds RNG states of %d ranks but this run has %d; ranks without a saved state "
                "keep their seeded one",
                len(states),
                trainer.world_size,
            )
        if trainer.global_rank < len(states):
            _set_rng_state(states[trainer.global_rank])


def _rng_state() -> dict[str, Any]:
    # Plain tuples, lists and tensors only, so that weights-only loading accepts the checkpoint.
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
