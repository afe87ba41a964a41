"""PretrainModule inside a real Lightning Trainer: logging, bias balancing under accumulation, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.lightning.optim import OptimConfig
from sdmoe_train.models.config import TransformerConfig
from sdmoe_train.models.presets import tiny_deepseek_moe
from tests.integration.trainers import cpu_trainer

VOCAB = 64
SEQ = 16


def _arch() -> TransformerConfig:
    arch = tiny_deepseek_moe()
    arch.vocab_size, arch.n_layers, arch.max_seq_len = VOCAB, 2, SEQ
    arch.moe.bias_update_rate = 0.01
    return arch


def _loader(num_batches: int, batch_size: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, VOCAB, (num_batches * batch_size, SEQ + 1), generator=generator)
    return DataLoader(
        TensorDataset(blocks), batch_size=batch_size, collate_fn=lambda rows: torch.stack([r[0] for r in rows])
    )


class _CountingModule(PretrainModule):
    """Records the routing counts of every micro-batch and the bias after every optimizer step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batch_loads: list[torch.Tensor] = []
        self.biases_after_step: list[torch.Tensor] = []

    def _record_routing(self, moe) -> None:
        self.micro_batch_loads.append(moe.tokens_per_expert_LE.clone())
        super()._record_routing(moe)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.biases_after_step.append(self._biases())

    def _biases(self) -> torch.Tensor:
        return torch.stack([layer.router.selection_bias.clone() for _, layer in self.model.moe_layers()])


def test_bias_update_runs_once_per_optimizer_step_on_loads_summed_over_micro_batches(tmp_path: Path) -> None:
    module = _CountingModule(_arch(), OptimConfig(warmup_steps=1, schedule="constant"))
    module.configure_model()
    initial = module._biases()
    trainer = cpu_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2)
    trainer.fit(module, train_dataloaders=_loader(6))
    assert len(module.micro_batch_loads) == 6
    assert len(module.biases_after_step) == 3
    previous = initial
    rate = module.arch.moe.bias_update_rate
    for step, bias in enumerate(module.biases_after_step):
        load = module.micro_batch_loads[2 * step] + module.micro_batch_loads[2 * step + 1]
        expected = previous + rate * torch.sign(load.float().mean(dim=-1, keepdim=True) - load.float())
        torch.testing.assert_close(bias, expected)
        previous = bias


def test_training_logs_losses_per_layer_learning_rate_throughput_and_grad_norm(tmp_path: Path) -> None:
    module = PretrainModule(_arch(), OptimConfig(warmup_steps=1, schedule="constant"))
    trainer = cpu_trainer(tmp_path, max_steps=2, limit_val_batches=2, val_check_interval=2)
    trainer.fit(module, train_dataloaders=_loader(2), val_dataloaders=_loader(2))
    logged = set(trainer.logged_metrics)
    expected = {
        "train/loss",
        "train/lm_loss",
        "train/moe_aux_loss",
        "train/lr",
        "train/grad_norm",
        "train/tokens_seen",
        "train/tokens_per_sec",
        "val/loss",
        "val/perplexity",
    }
    for name in ("load_balance_loss", "seq_balance_loss", "z_loss"):
        expected |= {f"moe/{name}/layer_{index:02d}" for index, _ in module.model.moe_layers()}
    assert expected <= logged, expected - logged
    assert module.tokens_seen == 2 * 2 * SEQ
    val_loss = trainer.logged_metrics["val/loss"]
    torch.testing.assert_close(trainer.logged_metrics["val/perplexity"], val_loss.exp(), rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trips_tokens_seen_and_routing_biases(tmp_path: Path) -> None:
    module = PretrainModule(_arch(), OptimConfig(warmup_steps=1, schedule="constant"))
    trainer = cpu_trainer(tmp_path, max_steps=2)
    trainer.fit(module, train_dataloaders=_loader(2))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = PretrainModule.load_from_checkpoint(path)
    assert restored.tokens_seen == module.tokens_seen > 0
    for (_, saved), (_, loaded) in zip(module.model.moe_layers(), restored.model.moe_layers(), strict=True):
        assert saved.router.selection_bias.abs().sum() > 0
        torch.testing.assert_close(loaded.router.selection_bias, saved.router.selection_bias)


def test_tokenizer_larger_than_the_model_vocabulary_is_a_config_error() -> None:
    module = PretrainModule(_arch())

    class _Data(L.LightningDataModule):
        vocab_size = VOCAB + 1

    trainer = L.Trainer(accelerator="cpu", logger=False)
    trainer.datamodule = _Data()
    module.trainer = trainer
    with pytest.raises(ConfigError, match=r"model.arch.vocab_size=64 .* \(65\)"):
        module.setup("fit")
