"""NonFiniteGuard: a non-finite step changes nothing and is counted; too many in a row stop training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sdmoe_train.errors import TrainingHaltedError
from sdmoe_train.lightning.callbacks import NonFiniteGuard
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from tests.integration.test_module import _arch, _loader
from tests.integration.trainers import cpu_trainer


class _PoisonGradients(L.Callback):
    """Makes the gradients of the given (1-based) optimizer steps NaN and snapshots the model after each step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step + 1 in self.steps:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("nan"))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.snapshots.append({k: v.clone() for k, v in pl_module.state_dict().items()})


def test_nonfinite_step_is_skipped_without_touching_weights_biases_or_moments(tmp_path: Path) -> None:
    module = PretrainModule(_arch(), OptimConfig(warmup_steps=1, schedule="constant"))
    poison, guard = _PoisonGradients({2}), NonFiniteGuard(max_consecutive=2)
    cpu_trainer(tmp_path, max_steps=4, callbacks=[poison, guard]).fit(module, _loader(4))
    before, skipped, after = poison.snapshots[0], poison.snapshots[1], poison.snapshots[2]
    for key in before:
        torch.testing.assert_close(skipped[key], before[key], rtol=0, atol=0, msg=f"{key} changed on a skipped step")
    assert any(not torch.equal(after[key], skipped[key]) for key in before), "training did not go on"
    assert guard.skipped_total == 1 and guard.consecutive == 0
    steps = {int(state["step"]) for state in module.optimizers().optimizer.state.values()}
    assert steps == {3}, "AdamW counted the skipped step"


def test_consecutive_nonfinite_steps_stop_training_with_a_clear_message(tmp_path: Path) -> None:
    module = PretrainModule(_arch(), OptimConfig(warmup_steps=1, schedule="constant"))
    guard = NonFiniteGuard(max_consecutive=3)
    with pytest.raises(TrainingHaltedError, match=r"3 consecutive optimizer steps .* Lower model.optim.lr"):
        cpu_trainer(tmp_path, max_steps=10, callbacks=[_PoisonGradients(set(range(2, 11))), guard]).fit(
            module, _loader(10)
        )
    assert guard.skipped_total == 3
