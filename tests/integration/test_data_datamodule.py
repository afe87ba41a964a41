"""PretrainDataModule under a real Lightning Trainer: batches, validation and exact resume from checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer

from sdmoe_train.data.config import DataConfig
from sdmoe_train.data.datamodule import PretrainDataModule
from sdmoe_train.errors import ConfigError
from tests.corpora import make_config, make_documents, make_tokenizer, write_documents
from tests.integration.trainers import quiet_cpu_trainer

BATCH = 4


class Recorder(L.LightningModule):
    """Records every batch its training step sees; its loss never moves the (unused) weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.train_batches: list[torch.Tensor] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.train_batches.append(batch.clone())
        return self.weight.sum() * 0.0 + batch.float().mean() * 0.0 + self.weight.square().sum()

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.val_batches.append(batch.clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(max_steps: int, **overrides: object) -> L.Trainer:
    return quiet_cpu_trainer(**({"devices": 1, "max_steps": max_steps} | overrides))


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[str, Path, Tokenizer]:
    documents = make_documents(count=16)
    pattern = write_documents(tmp_path / "corpus", documents)
    tokenizer_path, tokenizer = make_tokenizer(tmp_path, documents)
    return pattern, tokenizer_path, tokenizer


def _config(tmp_path: Path, corpus, **overrides: object) -> DataConfig:
    return make_config(tmp_path, corpus[0], corpus[1], **overrides)


def _fit(config: DataConfig, max_steps: int, ckpt_path: Path | None = None, **trainer_settings: object):
    module, data = Recorder(), PretrainDataModule(config, batch_size=BATCH, **trainer_settings.pop("data", {}))
    trainer = _trainer(max_steps, **trainer_settings)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return trainer, module, data


def test_batches_are_int64_blocks_and_validation_is_not_counted(tmp_path: Path, corpus) -> None:
    config = _config(tmp_path, corpus)
    trainer, module, data = _fit(config, max_steps=3, val_check_interval=2, num_sanity_val_steps=2)
    assert len(module.train_batches) == 3 and module.val_batches
    assert all(batch.shape == (BATCH, 17) and batch.dtype == torch.int64 for batch in module.train_batches)
    assert data.state_dict() == {"epoch": 0, "consumed": 3 * BATCH, "num_replicas": 1}
    assert data.vocab_size == corpus[2].get_vocab_size() and data.eos_token_id == 0


class PreemptedError(RuntimeError):
    pass


class SaveThenDie(L.Callback):
    """Saves a checkpoint after training step `step` (as ModelCheckpoint does) and kills the run."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise PreemptedError(f"killed after step {self.step}")


def _interrupted_run(config: DataConfig, stop: int, how: str, checkpoint: Path, **settings: object) -> Recorder:
    """Trains until step `stop`, leaving a checkpoint; returns the module that recorded the batches."""
    if how == "max_steps":
        trainer, module, _ = _fit(config, stop, **settings)
        trainer.save_checkpoint(checkpoint)
        return module
    module = Recorder()
    data = PretrainDataModule(config, batch_size=BATCH, **settings.pop("data", {}))
    trainer = _trainer(stop + 10, callbacks=[SaveThenDie(stop, checkpoint)], **settings)
    with pytest.raises(PreemptedError):
        trainer.fit(module, datamodule=data)
    return module


@pytest.mark.parametrize(
    ("how", "interrupt_at", "num_workers"),
    [
        ("killed", "mid_epoch", 0),
        ("killed", "epoch_end", 0),
        ("killed", "epoch_end+2", 0),
        ("max_steps", "mid_epoch", 0),
        ("max_steps", "epoch_end", 0),
        ("max_steps", "epoch_end+2", 0),
        ("killed", "mid_epoch", 2),
        ("max_steps", "epoch_end", 2),
    ],
)
def test_resumed_run_sees_exactly_the_uninterrupted_batches(
    tmp_path: Path, corpus, how: str, interrupt_at: str, num_workers: int
) -> None:
    config = _config(tmp_path, corpus)
    settings = {"data": {"num_workers": num_workers}, "val_check_interval": 5}
    probe = PretrainDataModule(config, batch_size=BATCH)
    probe.prepare_data()
    probe.setup("fit")
    per_epoch = len(probe.train_dataloader())
    stop = {"mid_epoch": 3, "epoch_end": per_epoch, "epoch_end+2": per_epoch + 2}[interrupt_at]
    total = 2 * per_epoch + 3

    _, uninterrupted, _ = _fit(config, total, **settings)
    checkpoint = tmp_path / "interrupted.ckpt"
    first = _interrupted_run(config, stop, how, checkpoint, **settings)
    second_trainer, second, _ = _fit(config, total, ckpt_path=checkpoint, **settings)

    assert second_trainer.global_step == total
    seen = first.train_batches + second.train_batches
    assert len(seen) == len(uninterrupted.train_batches) == total
    for index, (batch, expected) in enumerate(zip(seen, uninterrupted.train_batches, strict=True)):
        assert torch.equal(batch, expected), f"batch {index} differs after resuming at step {stop}"
    # Epochs really differ, so the comparison above would catch a replayed epoch.
    assert not torch.equal(uninterrupted.train_batches[0], uninterrupted.train_batches[per_epoch])


def test_streaming_run_resumes_exactly(tmp_path: Path, corpus) -> None:
    config = _config(tmp_path, corpus, streaming=True, shuffle_buffer=0, streaming_val_docs=2)
    _, uninterrupted, _ = _fit(config, 12, val_check_interval=5, check_val_every_n_epoch=None)
    first_trainer, first, _ = _fit(config, 5, val_check_interval=5, check_val_every_n_epoch=None)
    checkpoint = tmp_path / "stream.ckpt"
    first_trainer.save_checkpoint(checkpoint)
    _, second, _ = _fit(config, 12, ckpt_path=checkpoint, val_check_interval=5, check_val_every_n_epoch=None)
    seen = first.train_batches + second.train_batches
    assert len(seen) == 12 and uninterrupted.val_batches
    assert all(torch.equal(batch, expected) for batch, expected in zip(seen, uninterrupted.train_batches, strict=True))


class RecorderWithExample(Recorder):
    """Has an example_input_array, which ModelSummary pushes through on_before_batch_transfer."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.zeros(BATCH, 17, dtype=torch.long)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.float() * self.weight


def test_model_summary_example_input_is_not_counted_as_a_batch(tmp_path: Path, corpus) -> None:
    data = PretrainDataModule(_config(tmp_path, corpus), batch_size=BATCH)
    # The second fit finds the sampler already built when ModelSummary runs the example input.
    for _ in range(2):
        _trainer(2, enable_model_summary=True).fit(RecorderWithExample(), datamodule=data)
    assert data.state_dict()["consumed"] == 4 * BATCH


def test_no_validation_split_means_no_validation(tmp_path: Path, corpus) -> None:
    _, module, _ = _fit(_config(tmp_path, corpus, val_fraction=0.0), max_steps=2, val_check_interval=1)
    assert len(module.train_batches) == 2 and not module.val_batches


def test_missing_tokenizer_asks_for_the_prepare_step(tmp_path: Path, corpus) -> None:
    data = PretrainDataModule(make_config(tmp_path, corpus[0], tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"data\.corpus\.tokenizer='.*missing/tokenizer\.json'.*sdmoe-train prepare"):
        data.prepare_data()


def test_sequence_longer_than_the_data_names_the_split(tmp_path: Path, corpus) -> None:
    data = PretrainDataModule(_config(tmp_path, corpus, seq_len=5000))
    data.prepare_data()
    with pytest.raises(ConfigError, match=r"the train split has \d+ tokens but data\.corpus\.seq_len=5000"):
        data.setup("fit")


def test_batch_larger_than_the_split_is_a_config_error(tmp_path: Path, corpus) -> None:
    data = PretrainDataModule(_config(tmp_path, corpus, seq_len=128), batch_size=64)
    data.prepare_data()
    data.setup("fit")
    with pytest.raises(ConfigError, match=r"fewer than batch_size=64"):
        data.train_dataloader()


def test_streaming_with_workers_is_rejected(tmp_path: Path, corpus) -> None:
    with pytest.raises(ConfigError, match=r"num_workers=2 with data\.corpus\.streaming=true"):
        PretrainDataModule(_config(tmp_path, corpus, streaming=True), num_workers=2)


def test_checkpoint_from_the_other_mode_is_rejected(tmp_path: Path, corpus) -> None:
    data = PretrainDataModule(_config(tmp_path, corpus, streaming=True))
    with pytest.raises(ConfigError, match=r"saved with data\.corpus\.streaming=False but data\.corpus\.streaming=True"):
        data.load_state_dict({"epoch": 0, "consumed": 8, "num_replicas": 1})
