"""Monitoring callbacks fed constructed statistics through a stub Trainer: logged keys and values, rank behaviour."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks import (
    GateAlignmentMonitor,
    GradientAlignmentMonitor,
    RoutingHealthMonitor,
    SpectralOverlapMonitor,
)
from sdmoe_train.lightning.contract import MoETrainingModule
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.models.presets import tiny_qwen_moe
from sdmoe_train.models.transformer import MoEAux, Transformer
from sdmoe_train.moe.sdmoe import SDMoEConfig, apply_spectral_decoupling


class _RecordingLogger:
    def __init__(self) -> None:
        self.logged: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logged.setdefault(step, {}).update(metrics)


class _TwoRankStrategy:
    """Answers collectives as if a second rank held the same values, and records each call."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reduce(self, tensor: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
        self.calls.append(f"reduce:{reduce_op}")
        return tensor * 2 if reduce_op == "sum" else tensor

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        self.calls.append("broadcast")
        return obj


def _trainer(tmp_path: Path, rank_zero: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        global_step=0,
        is_global_zero=rank_zero,
        strategy=_TwoRankStrategy(),
        loggers=[_RecordingLogger()],
        log_dir=str(tmp_path),
        default_root_dir=str(tmp_path),
    )


def _model(sdmoe: bool = False) -> Transformer:
    arch = tiny_qwen_moe()
    arch.n_layers, arch.vocab_size, arch.max_seq_len, arch.hidden_dim = 2, 64, 16, 32
    arch.dense_hidden_dim, arch.moe.num_experts, arch.moe.expert_hidden_dim = 64, 4, 24
    model = Transformer(arch)
    apply_spectral_decoupling(model, SDMoEConfig(enabled=sdmoe, rank=2))
    return model


def _module(model: Transformer) -> SimpleNamespace:
    """The side of PretrainModule the callbacks see (sdmoe_train.lightning.contract.MoETrainingModule)."""
    return SimpleNamespace(model=model, expert_groups=None, last_routing=None, step_skipped=False, tokens_seen=0)


def _fake_routing(counts_LE: list[list[int]], z_loss: float) -> MoEAux:
    layers = len(counts_LE)
    return MoEAux(
        loss=torch.zeros(()),
        layer_indices=tuple(range(layers)),
        load_balance_loss_L=torch.ones(layers),
        sequence_balance_loss_L=torch.ones(layers),
        z_loss_L=torch.full((layers,), z_loss),
        tokens_per_expert_LE=torch.tensor(counts_LE),
        dropped_fraction_L=torch.zeros(layers),
    )


def test_routing_health_sums_micro_batches_reduces_over_ranks_and_logs_known_values(tmp_path: Path) -> None:
    trainer, module = _trainer(tmp_path), _module(_model())
    monitor = RoutingHealthMonitor(every_n_steps=2)
    monitor.setup(trainer, module, "fit")
    feeds = [
        ([[4, 0, 0, 0], [1, 1, 1, 1]], 1.0),
        ([[4, 0, 0, 0], [2, 2, 2, 2]], 3.0),
        ([[8, 0, 0, 0], [1, 1, 1, 1]], 5.0),
    ]
    for step, (counts, z_loss) in enumerate(feeds, start=1):
        module.last_routing = _fake_routing(counts, z_loss)
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, 0)
        monitor.on_train_batch_end(trainer, module, None, None, 0)  # the same record again: counted once
    logged = trainer.loggers[0].logged
    assert list(logged) == [2]
    metrics = logged[2]
    assert metrics["routing/dead_expert_fraction/layer_00"] == 0.75
    assert metrics["routing/load_entropy/layer_00"] == 0.0
    assert metrics["routing/max_mean_load/layer_00"] == 4.0
    assert metrics["routing/load_entropy/layer_01"] == pytest.approx(1.0)
    assert metrics["routing/load_cv/layer_01"] == pytest.approx(0.0)
    assert metrics["routing/load_fraction/layer_00/expert_00"] == 1.0
    assert metrics["routing/z_loss/layer_01"] == pytest.approx(2.0)  # mean over the interval's micro-batches
    assert metrics["routing/dead_expert_fraction"] == pytest.approx(0.375)
    assert metrics["routing/bias_abs_mean/layer_00"] == 0.0
    assert metrics["routing/token_copies/layer_00"] == 2 * 8  # two micro-batches, summed over two "ranks"
    # Counts summed over "ranks" (x2) before the statistics, losses averaged: two reductions per interval.
    assert monitor.state_dict()["counts_LE"].tolist() == [[8, 0, 0, 0], [1, 1, 1, 1]]  # the next interval's
    assert trainer.strategy.calls == ["reduce:sum", "reduce:mean", "reduce:mean", "reduce:mean"]


def test_other_ranks_join_every_collective_but_write_nothing(tmp_path: Path) -> None:
    runs = {}
    for rank_zero in (True, False):
        trainer = _trainer(tmp_path / str(rank_zero), rank_zero)
        module = _module(_model(sdmoe=True))
        monitors = [
            RoutingHealthMonitor(every_n_steps=1),
            SpectralOverlapMonitor(every_n_steps=1, rank=2),
            GateAlignmentMonitor(every_n_steps=1, directions=2),
        ]
        batch = torch.randint(0, 64, (2, 9))
        for monitor in monitors:
            monitor.setup(trainer, module, "fit")
            monitor.on_train_batch_start(trainer, module, batch, 0)
        module.last_routing = module.model(batch[:, :-1]).moe
        trainer.global_step = 1
        for monitor in monitors:
            monitor.on_train_batch_end(trainer, module, None, batch, 0)
        runs[rank_zero] = trainer
    assert runs[True].strategy.calls == runs[False].strategy.calls
    assert "broadcast" in runs[True].strategy.calls
    assert runs[True].loggers[0].logged[1] and not runs[False].loggers[0].logged
    assert (tmp_path / "True" / "monitor" / "figures.jsonl").is_file()
    assert not (tmp_path / "False").exists()


def test_spectral_overlap_of_identical_experts_is_one_and_of_random_experts_near_chance(tmp_path: Path) -> None:
    model = _model()
    trainer, module = _trainer(tmp_path), _module(model)
    monitor = SpectralOverlapMonitor(every_n_steps=1, rank=2, matrices=["up"])
    monitor.setup(trainer, module, "fit")
    with torch.no_grad():
        first = model.blocks[0].ffn.experts.up_proj
        first.copy_(first[0].expand_as(first))
    trainer.global_step = 1
    monitor.on_train_batch_end(trainer, module, None, None, 0)
    metrics = trainer.loggers[0].logged[1]
    assert metrics["spectral/proxy_up_left_overlap_mean/layer_00"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["spectral/proxy_up_right_overlap_max/layer_00"] == pytest.approx(1.0, abs=1e-4)
    # Random Gaussian experts: about r/m = 2/24 on the left, 2/32 on the right.
    assert metrics["spectral/proxy_up_left_overlap_mean/layer_01"] < 0.25
    assert set(metrics) == {
        f"spectral/proxy_up_{side}_overlap_{stat}/layer_{layer:02d}"
        for side in ("left", "right")
        for stat in ("mean", "max")
        for layer in (0, 1)
    } | {"spectral/proxy_overlap_mean", "spectral/proxy_overlap_max"}


def test_gradient_alignment_sums_only_the_window_and_sees_a_planted_shared_gradient(tmp_path: Path) -> None:
    model = _model()
    trainer, module = _trainer(tmp_path), _module(model)
    monitor = GradientAlignmentMonitor(every_n_steps=4, window=2, rank=1, common_rank=1, matrices=["gate"])
    monitor.setup(trainer, module, "fit")
    bank = model.blocks[1].ffn.experts
    shared = torch.outer(torch.randn(24), torch.randn(32))
    for step in range(1, 5):
        noise = 0.01 * torch.randn(4, 24, 32)
        for _, layer in model.moe_layers():
            layer.experts.gate_proj.grad = shared + noise if layer.experts is bank else torch.randn(4, 24, 32)
        trainer.global_step = step - 1
        monitor.on_before_optimizer_step(trainer, module, None)
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, 0)
    metrics = trainer.loggers[0].logged[4]
    assert metrics["gradient/window_steps"] == 2  # steps 3 and 4 only
    assert metrics["gradient/gate_left_alignment_mean/layer_01"] > 0.99
    assert metrics["gradient/gate_left_alignment_mean/layer_00"] < 0.5
    assert not monitor.state_dict()["sums"], "the window is cleared after publishing"


@pytest.mark.parametrize("monitor_type", [RoutingHealthMonitor, SpectralOverlapMonitor, GateAlignmentMonitor])
def test_a_module_without_the_callback_contract_is_refused_at_setup(tmp_path: Path, monitor_type: type) -> None:
    module = SimpleNamespace(model=_model(), last_routing=None)
    with pytest.raises(ConfigError, match=rf"{monitor_type.__name__} needs a LightningModule with expert_groups, "):
        monitor_type(every_n_steps=1).setup(_trainer(tmp_path), module, "fit")


def test_pretrain_module_provides_the_callback_contract() -> None:
    module = PretrainModule(tiny_qwen_moe())
    assert isinstance(module, MoETrainingModule)
    assert module.expert_groups is None and module.last_routing is None and module.step_skipped is False
