"""The CLI's own checks of user input: trainer settings Lightning leaves to the training loop, output paths."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sdmoe_train.cli.outputs import check_creatable_directory, check_output_directory, check_output_file
from sdmoe_train.cli.trainer_checks import check_trainer_settings
from sdmoe_train.errors import ConfigError
from sdmoe_train.evaluation.options import check_run_options

LIGHTNING_DEFAULTS = {
    "accumulate_grad_batches": 1,
    "gradient_clip_val": None,
    "val_check_interval": None,
    "check_val_every_n_epoch": 1,
    "log_every_n_steps": None,
    "min_steps": None,
    "num_sanity_val_steps": None,
}


def _trainer(**changes: object) -> SimpleNamespace:
    return SimpleNamespace(**{**LIGHTNING_DEFAULTS, **changes})


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"accumulate_grad_batches": 4, "gradient_clip_val": 1.0, "val_check_interval": 50},
        {"gradient_clip_val": 0, "val_check_interval": 0.25, "check_val_every_n_epoch": None},
        {"val_check_interval": "00:01:00:00", "log_every_n_steps": 0, "min_steps": 0, "num_sanity_val_steps": -1},
    ],
    ids=["defaults", "typical", "fractional_interval", "timed_interval"],
)
def test_valid_trainer_settings_pass(changes: dict[str, object]) -> None:
    check_trainer_settings(_trainer(**changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"accumulate_grad_batches": 0}, "trainer.accumulate_grad_batches=0 must be >= 1"),
        ({"accumulate_grad_batches": -2}, "trainer.accumulate_grad_batches=-2 must be >= 1"),
        ({"gradient_clip_val": -1.0}, "trainer.gradient_clip_val=-1.0 must be a finite number >= 0"),
        ({"gradient_clip_val": float("nan")}, "trainer.gradient_clip_val=nan must be a finite number >= 0"),
        ({"gradient_clip_val": float("inf")}, "trainer.gradient_clip_val=inf"),
        ({"val_check_interval": 0}, "trainer.val_check_interval=0 would validate"),
        ({"val_check_interval": 0.0}, "trainer.val_check_interval=0 would validate"),
        ({"check_val_every_n_epoch": 0}, "trainer.check_val_every_n_epoch=0 must be >= 1"),
        ({"log_every_n_steps": -1}, "trainer.log_every_n_steps=-1 must be >= 0"),
        ({"min_steps": -3}, "trainer.min_steps=-3 must be >= 0"),
        ({"num_sanity_val_steps": -2}, "trainer.num_sanity_val_steps=-2 must be >= -1"),
    ],
)
def test_trainer_settings_that_fail_in_the_training_loop_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_trainer_settings(_trainer(**changes))


def test_output_paths_are_checked_without_creating_anything(tmp_path: Path) -> None:
    assert check_output_directory(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    assert check_output_file(tmp_path / "new" / "out.json", "--output") == tmp_path / "new" / "out.json"
    assert list(tmp_path.iterdir()) == [], "a command refused afterwards would leave these folders behind"


def test_output_directory_must_not_be_nor_lie_below_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out='.*file' is a file, not a directory"):
        check_output_directory(tmp_path / "file", "--out")
    with pytest.raises(ConfigError, match=r"cannot write to '.*file/below' \(--out\): .*file is a file"):
        check_output_directory(tmp_path / "file" / "below", "--out")


def test_output_file_must_not_be_a_directory_nor_lie_below_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--output='.*' is a directory; give a file name"):
        check_output_file(tmp_path, "--output")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write to '.*file' \(--output\): .*file is a file"):
        check_output_file(tmp_path / "file" / "out.json", "--output")


def test_a_directory_still_to_be_created_is_checked_without_creating_it(tmp_path: Path) -> None:
    check_creatable_directory(tmp_path / "run" / "logs", "trainer.logger CSVLogger save_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write to '.*file/logs' \(save_dir\): .*file is a file"):
        check_creatable_directory(tmp_path / "file" / "logs", "save_dir")
    with pytest.raises(ConfigError, match=r"file is a file"):
        check_creatable_directory(tmp_path / "file", "save_dir")


GOOD_RUN_OPTIONS = {"limit": None, "num_fewshot": None, "batch_size": 16, "max_gen_toks": 256, "bootstrap_iters": 0}


@pytest.mark.parametrize("limit", [None, 0.5, 1, 3.0, 40])
def test_lm_eval_limits_that_lm_eval_reads_as_meant_pass(limit: float | None) -> None:
    check_run_options("--", **{**GOOD_RUN_OPTIONS, "limit": limit})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"limit": 0}, "--limit=0 must be > 0"),
        ({"limit": 1.5}, "--limit=1.5: a count of documents per task must be whole"),
        ({"num_fewshot": -1}, "--num_fewshot=-1 must be >= 0"),
        ({"batch_size": 0}, "--batch_size=0 must be >= 1"),
        ({"max_gen_toks": 0}, "--max_gen_toks=0 must be >= 1"),
        ({"bootstrap_iters": -5}, "--bootstrap_iters=-5 must be >= 0"),
    ],
)
def test_lm_eval_options_it_would_misread_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_run_options("--", **{**GOOD_RUN_OPTIONS, **changes})
