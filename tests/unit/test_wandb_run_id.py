"""The W&B run id is created once per run directory and reused by every resumed or requeued job."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import Namespace

from sdmoe_train.checkpointing.wandb_run_id import WANDB_RUN_ID_FILE, persist_wandb_run_id


def _trainer_config(run_dir: Path, run_id: str | None = None) -> Namespace:
    logger = Namespace(
        class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(id=run_id, version=None, save_dir=None)
    )
    return Namespace(default_root_dir=str(run_dir), logger=logger)


def test_resumed_job_reuses_the_run_id_stored_in_the_run_directory(tmp_path: Path) -> None:
    first, requeued = _trainer_config(tmp_path), _trainer_config(tmp_path)
    persist_wandb_run_id(first)
    persist_wandb_run_id(requeued)
    run_id = first.logger.init_args.id
    assert run_id and len(run_id) == 8
    assert requeued.logger.init_args.id == run_id
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text().strip() == run_id


def test_an_explicit_id_is_kept_and_nothing_is_written(tmp_path: Path) -> None:
    config = _trainer_config(tmp_path, run_id="chosen01")
    persist_wandb_run_id(config)
    assert config.logger.init_args.id == "chosen01"
    assert not (tmp_path / WANDB_RUN_ID_FILE).exists()
