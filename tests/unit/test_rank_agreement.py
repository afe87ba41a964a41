"""What every data-parallel rank must agree on, checked in one process against a stand-in for the other rank.

A real two-process run costs seconds per process; these tests give the module a strategy whose ``reduce``
adds a second rank's value, so leaving out the reduction (each rank deciding on its own numbers) fails here
in milliseconds. The two-process runs of tests/integration check the same against real gloo collectives.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sdmoe_train.lightning.callbacks import NonFiniteGuard
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.models.presets import tiny_deepseek_moe


class _TwoRankStrategy:
    """``strategy.reduce`` of a world of two ranks, the other rank holding ``other``."""

    def __init__(self, other: torch.Tensor) -> None:
        self.other = other
        self.root_device = torch.device("cpu")
        self.reduced: list[str] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        self.reduced.append(reduce_op)
        return {"sum": tensor + self.other, "max": torch.maximum(tensor, self.other)}[reduce_op]


def _module(strategy: _TwoRankStrategy, world_size: int = 2) -> PretrainModule:
    arch = tiny_deepseek_moe()
    arch.vocab_size, arch.n_layers, arch.max_seq_len = 64, 2, 16
    arch.moe.bias_update_rate = 0.01
    module = PretrainModule(arch, OptimConfig(warmup_steps=1, schedule="constant"))
    module.configure_model()
    module._trainer = SimpleNamespace(strategy=strategy, world_size=world_size, global_step=0)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return module


def _biases(module: PretrainModule) -> torch.Tensor:
    return torch.stack([layer.router.selection_bias.clone() for _, layer in module.model.moe_layers()])


def _step(module: PretrainModule) -> None:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    module.optimizer_step(0, 0, optimizer, lambda: None)


def test_bias_balancing_uses_the_load_summed_over_data_parallel_ranks() -> None:
    # This rank sent almost everything to expert 0, the other rank to expert 1: only the sum says that
    # experts 0 and 1 are the busy ones overall and expert 2 the idle one.
    strategy = _TwoRankStrategy(torch.zeros(()))
    module = _module(strategy)
    before = _biases(module)
    here_LE, other_LE = torch.zeros_like(before), torch.zeros_like(before)
    here_LE[:, 0], here_LE[:, 2], other_LE[:, 1] = 30.0, 1.0, 40.0
    strategy.other = other_LE
    module._load_since_step_LE = here_LE.clone()
    _step(module)

    total_LE = here_LE + other_LE
    expected = before + 0.01 * torch.sign(total_LE.mean(dim=-1, keepdim=True) - total_LE)
    torch.testing.assert_close(_biases(module), expected)
    assert strategy.reduced == ["sum"]


def test_tokens_seen_counts_the_tokens_of_every_rank() -> None:
    module = _module(_TwoRankStrategy(torch.zeros(())), world_size=4)
    module._tokens_since_step = 96
    _step(module)
    _step(module)  # nothing new since the last step
    assert module.tokens_seen == 4 * 96


@pytest.mark.parametrize("other_rank_bad", [True, False])
def test_a_non_finite_gradient_on_another_rank_skips_the_step_here_too(other_rank_bad: bool) -> None:
    strategy = _TwoRankStrategy(torch.tensor([1.0 if other_rank_bad else 0.0]))
    module = _module(strategy)
    for parameter in module.parameters():
        parameter.grad = torch.ones_like(parameter)  # finite on this rank
    guard = NonFiniteGuard(max_consecutive=5)
    trainer: Any = SimpleNamespace(strategy=strategy, world_size=2, global_step=3)
    guard.on_before_optimizer_step(trainer, module, torch.optim.SGD(module.parameters(), lr=0.0))
    assert strategy.reduced == ["max"]
    assert module.step_skipped is other_rank_bad
    assert all((parameter.grad is None) is other_rank_bad for parameter in module.parameters())
    assert guard.skipped_total == int(other_rank_bad)
