"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

One NaN batch (a corrupt document, an overflow) should not poison AdamW's moments or end a run that
has been going for days, but a model that keeps producing NaN has diverged and must stop with the
last good checkpoint intact. After the backward pass (and DDP's all-reduce) the gradients' total norm
is checked; a non-finite loss makes it non-finite too. The ranks agree with one all-reduce, since
under expert parallelism expert gradients differ per rank. A skipped step drops every gradient, so
AdamW leaves weights and moments untouched; the step counter and learning-rate schedule still advance.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from sdmoe_train.errors import ConfigError, TrainingHaltedError
from sdmoe_train.lightning.contract import training_module

log = logging.getLogger(__name__)


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps with non-finite gradients and stops after ``max_consecutive`` in a row.

    Args:
        max_consecutive: Consecutive skipped steps after which training stops with an error. The
            checkpoints already written stay as they are (nothing is saved after a skipped step).
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"NonFiniteGuard max_consecutive={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped_total = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        training_module(pl_module, type(self).__name__)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        bad = (~torch.isfinite(norm)).to(torch.float32, copy=True).reshape(1).to(trainer.strategy.root_device)
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        if not bool(bad.item()):
            self.consecutive = 0
            pl_module.log("train/nonfinite_skipped", float(self.skipped_total))
            return
        self.consecutive += 1
        self.skipped_total += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped_total))
        log.warning(
            "step %d: non-finite loss or gradients, optimizer step skipped (%d in a row, %d in total)",
            trainer.global_step,
            self.consecutive,
            self.skipped_total,
        )
        # AdamW skips parameters without a gradient: no update, no weight decay, no moment change.
        for parameter in pl_module.parameters():
            parameter.grad = None
        training_module(pl_module, type(self).__name__).step_skipped = True
        if self.consecutive >= self.max_consecutive:
            checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
            raise TrainingHaltedError(
                f"{self.consecutive} consecutive optimizer steps (up to step {trainer.global_step}) had a non-finite "
                f"loss or gradients, so training stopped; the last good checkpoint is {checkpoint}. Lower "
                "model.optim.lr, raise warmup, set trainer.gradient_clip_val, or check the data around this step; "
                "resuming continues from that checkpoint"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consecutive = state_dict["consecutive"]
        self.skipped_total = state_dict["skipped_total"]
