"""NonFiniteGuard's decision in one process: which gradients make it skip the optimizer step.

The training runs of tests/integration/test_nonfinite.py poison gradients with NaN only; an infinite gradient
(an overflow, common in low precision) must be skipped just the same.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sdmoe_train.lightning.callbacks import NonFiniteGuard
from tests.unit.test_rank_agreement import _module, _TwoRankStrategy


@pytest.mark.parametrize(
    "value", [float("inf"), float("-inf"), float("nan"), 1.0], ids=["inf", "-inf", "nan", "finite"]
)
def test_a_step_with_a_non_finite_gradient_is_skipped_and_a_finite_one_kept(value: float) -> None:
    strategy = _TwoRankStrategy(torch.zeros(1))
    module = _module(strategy, world_size=1)
    for parameter in module.parameters():
        parameter.grad = torch.ones_like(parameter)
    next(iter(module.parameters())).grad[0] = value
    guard = NonFiniteGuard(max_consecutive=5)
    trainer: Any = SimpleNamespace(strategy=strategy, world_size=1, global_step=3)
    guard.on_before_optimizer_step(trainer, module, torch.optim.SGD(module.parameters(), lr=0.0))
    bad = value != 1.0
    assert strategy.reduced == [], "a single process has nobody to agree with"
    assert module.step_skipped is bad
    assert all((parameter.grad is None) is bad for parameter in module.parameters())
    assert (guard.skipped_total, guard.consecutive) == (int(bad), int(bad))
