"""One run, one directory: checkpoints, logs and the W&B id follow the run directory; metrics survive resumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from jsonargparse import Namespace

from sdmoe_train.checkpointing.run_directory import check_writable, derive_run_paths
from sdmoe_train.errors import ConfigError
from sdmoe_train.report.dashboard import read_run


def _trainer_config(run_dir: Path | None, logger: object = None) -> Namespace:
    checkpoint = Namespace(
        class_path="sdmoe_train.lightning.callbacks.PeriodicCheckpoint", init_args=Namespace(dirpath=None)
    )
    monitor = Namespace(class_path="sdmoe_train.lightning.callbacks.RoutingHealthMonitor", init_args=Namespace())
    return Namespace(
        default_root_dir=None if run_dir is None else str(run_dir), logger=logger, callbacks=[checkpoint, monitor]
    )


def test_checkpoints_and_a_per_attempt_csv_log_follow_the_run_directory(tmp_path: Path) -> None:
    config = _trainer_config(tmp_path / "elsewhere")
    assert derive_run_paths(config) == tmp_path / "elsewhere"
    assert config.callbacks[0].init_args.dirpath == str(tmp_path / "elsewhere" / "checkpoints")
    assert config.logger.class_path == "lightning.pytorch.loggers.CSVLogger"
    assert config.logger.init_args == Namespace(save_dir=str(tmp_path / "elsewhere"), name="logs", version=None)


def test_without_a_run_directory_the_working_directory_is_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = _trainer_config(None)
    derive_run_paths(config)
    assert config.default_root_dir == os.getcwd()
    assert config.callbacks[0].init_args.dirpath == str(Path(os.getcwd()) / "checkpoints")


def test_wandb_logs_under_the_run_directory_unless_told_otherwise(tmp_path: Path) -> None:
    wandb = Namespace(
        class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir=".", project="p")
    )
    config = _trainer_config(tmp_path, logger=wandb)
    derive_run_paths(config)
    assert config.logger.init_args.save_dir == str(tmp_path)
    wandb.init_args.save_dir = "/explicit"
    derive_run_paths(config)
    assert config.logger.init_args.save_dir == "/explicit"


def test_a_fixed_csv_version_that_would_truncate_earlier_metrics_is_refused(tmp_path: Path) -> None:
    logger = Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger",
        init_args=Namespace(save_dir=str(tmp_path), name="logs", version=""),
    )
    derive_run_paths(_trainer_config(tmp_path, logger=logger))  # nothing logged yet: fine
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/lm_loss\n0,5.0\n")
    with pytest.raises(ConfigError, match=r"version='' would overwrite .*metrics.csv.*remove `version`"):
        derive_run_paths(_trainer_config(tmp_path, logger=logger))


def test_an_unwritable_checkpoint_folder_is_named_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"cannot write to '{tmp_path / 'file' / 'checkpoints'}' \(the dirpath\)"):
        check_writable(tmp_path / "file" / "checkpoints", "the dirpath")
    if Path("/sys/kernel").is_dir():  # exists, but no one (not even root) may create files in it
        with pytest.raises(ConfigError, match=r"cannot write to '/sys/kernel' \(the dirpath\)"):
            check_writable("/sys/kernel", "the dirpath")
    check_writable(tmp_path / "new" / "checkpoints", "the dirpath")
    assert list((tmp_path / "new" / "checkpoints").iterdir()) == []


def _attempt(run_dir: Path, version: int, rows: list[tuple[int, float]], mtime: float) -> None:
    folder = run_dir / "logs" / f"version_{version}"
    folder.mkdir(parents=True)
    lines = ["step,train/lm_loss,val/loss"] + [f"{step},{loss}," for step, loss in rows]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    os.utime(folder / "metrics.csv", (mtime, mtime))


def test_report_joins_the_attempts_of_a_resumed_run(tmp_path: Path) -> None:
    # First attempt logs steps 0-6 and is killed; the resume from the step-4 checkpoint repeats 4-6 and goes on.
    _attempt(tmp_path, 0, [(step, 10.0 - step) for step in range(7)], mtime=1000)
    _attempt(tmp_path, 1, [(step, 5.0 - step / 10) for step in range(4, 9)], mtime=2000)
    points = read_run(tmp_path).scalars["train/lm_loss"]
    assert [step for step, _ in points] == list(range(9))
    assert points[3] == (3, 7.0) and points[4] == (4, 4.6)
