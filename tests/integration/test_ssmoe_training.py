"""SSMoE inside PretrainModule: periodic refresh, checkpoint and init_from semantics, logged diagnostics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.models.presets import tiny_deepseek_moe, tiny_qwen_moe
from sdmoe_train.moe.sdmoe import SDMoEConfig
from sdmoe_train.moe.ssmoe_router import SSMoEConfig, spectral_routers
from sdmoe_train.moe.ssmoe_rows import spectral_router_rows
from sdmoe_train.parallel.config import ParallelConfig
from tests.integration.trainers import cpu_trainer

VOCAB, SEQ = 64, 16
OPTIM = OptimConfig(lr=3e-3, warmup_steps=1, schedule="constant")


def _arch(family: str = "qwen"):
    arch = tiny_qwen_moe() if family == "qwen" else tiny_deepseek_moe()
    arch.vocab_size, arch.n_layers, arch.max_seq_len = VOCAB, 2, SEQ
    arch.hidden_dim, arch.dense_hidden_dim, arch.moe.expert_hidden_dim = 64, 64, 32
    return arch


def _loader(num_batches: int = 1) -> DataLoader:
    blocks = torch.randint(0, VOCAB, (2 * num_batches, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return DataLoader(list(blocks), batch_size=2)


def _rows(module: PretrainModule) -> list[torch.Tensor]:
    return [router.spectral_rows.clone() for _, router in spectral_routers(module.model)]


def _fresh_rows(module: PretrainModule) -> list[torch.Tensor]:
    return [
        spectral_router_rows(layer.experts, router.weight, router.ssmoe)
        for layer, router in spectral_routers(module.model)
    ]


class _RowRecorder(PretrainModule):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows_after_step: list[list[torch.Tensor]] = []
        self.fresh_after_step: list[list[torch.Tensor]] = []

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.rows_after_step.append(_rows(self))
        self.fresh_after_step.append(_fresh_rows(self))


@pytest.mark.parametrize("family", ["qwen", "deepseek"])
def test_u_is_refreshed_every_refresh_every_optimizer_steps(tmp_path: Path, family: str) -> None:
    module = _RowRecorder(_arch(family), OPTIM, ssmoe=SSMoEConfig(enabled=True, c=0.5, refresh_every=2))
    module.configure_model()
    initial = _rows(module)
    trainer = cpu_trainer(tmp_path, max_steps=4, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=_loader(2))
    previous = initial
    for step, (rows, fresh) in enumerate(zip(module.rows_after_step, module.fresh_after_step, strict=True), 1):
        for layer_rows, layer_fresh, layer_previous in zip(rows, fresh, previous, strict=True):
            if step % 2 == 0:
                assert torch.equal(layer_rows, layer_fresh), step
            else:
                assert torch.equal(layer_rows, layer_previous), step
                assert not torch.allclose(layer_fresh, layer_previous), step  # the weights did move
        previous = rows
    metrics = trainer.logged_metrics
    for quantity in ("spectral_entropy", "changed_share", "row_cos_mean", "learned_cos_mean", "load_entropy"):
        assert f"ssmoe/{quantity}/layer_01" in metrics


def test_checkpoint_restores_saved_u_and_rebuilds_it_when_settings_differ(tmp_path: Path) -> None:
    module = PretrainModule(_arch(), OPTIM, ssmoe=SSMoEConfig(enabled=True, k=4, refresh_every=0))
    trainer = cpu_trainer(tmp_path, max_steps=3)
    trainer.fit(module, train_dataloaders=_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    saved = _rows(module)
    assert not all(torch.equal(a, b) for a, b in zip(saved, _fresh_rows(module), strict=True))

    restored = PretrainModule.load_from_checkpoint(tmp_path / "model.ckpt")
    for rows, expected in zip(_rows(restored), saved, strict=True):
        assert torch.equal(rows, expected)
    rebuilt = PretrainModule.load_from_checkpoint(tmp_path / "model.ckpt", ssmoe=SSMoEConfig(enabled=True, k=2))
    for rows, fresh in zip(_rows(rebuilt), _fresh_rows(rebuilt), strict=True):
        assert torch.equal(rows, fresh)
    plain = PretrainModule.load_from_checkpoint(tmp_path / "model.ckpt", ssmoe=SSMoEConfig(enabled=False))
    assert not spectral_routers(plain.model)
    assert not any("spectral" in key for key in plain.state_dict())


def test_plain_checkpoint_and_init_from_get_u_from_the_loaded_weights(tmp_path: Path) -> None:
    module = PretrainModule(_arch(), OPTIM, SDMoEConfig(enabled=True, rank=4))
    trainer = cpu_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    tokens = torch.randint(0, VOCAB, (2, SEQ))

    for ssmoe in (SSMoEConfig(enabled=True, c=0.0), SSMoEConfig(enabled=True, c=0.0, variant="unique")):
        loaded = PretrainModule.load_from_checkpoint(tmp_path / "plain.ckpt", ssmoe=ssmoe)
        started = PretrainModule(
            _arch(), OPTIM, SDMoEConfig(enabled=True, rank=4), str(tmp_path / "plain.ckpt"), ssmoe=ssmoe
        )
        started.configure_model()
        for candidate in (loaded, started):
            for rows, fresh in zip(_rows(candidate), _fresh_rows(candidate), strict=True):
                assert torch.equal(rows, fresh) and rows.abs().sum() > 0
            with torch.no_grad():
                assert torch.equal(candidate(tokens), module(tokens))  # c = 0: same function as without SSMoE


def test_validation_logs_routing_health_per_layer(tmp_path: Path) -> None:
    module = PretrainModule(_arch("deepseek"), OPTIM, ssmoe=SSMoEConfig(enabled=True, c=1.0))
    trainer = cpu_trainer(tmp_path, max_steps=1)
    trainer.validate(module, dataloaders=_loader(2), verbose=False)
    with open(tmp_path / "metrics.csv") as handle:
        row = next(csv.DictReader(handle))
    layer = f"{_arch('deepseek').moe.first_k_dense:02d}"
    for quantity in ("load_entropy", "dead_expert_fraction", "load_cv"):
        assert 0.0 <= float(row[f"val/{quantity}/layer_{layer}"]) <= 10.0
    assert float(row[f"val/load_entropy/layer_{layer}"]) > 0.0


def test_ssmoe_with_expert_parallelism_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"ssmoe.enabled=true with model.parallel.ep_size=2.*ep_size=1"):
        PretrainModule(tiny_qwen_moe(), ssmoe=SSMoEConfig(enabled=True), parallel=ParallelConfig(ep_size=2))
