"""The DownstreamEvaluation callback inside training: logged keys, an untouched run, exact resume, DDP."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("lm_eval")

from sdmoe_train.cli import main  # noqa: E402
from sdmoe_train.errors import ConfigError  # noqa: E402
from sdmoe_train.lightning.callbacks import DownstreamEvaluation  # noqa: E402
from tests.integration.evaluation_runs import StateProbe, TinyRun, train_tiny_run  # noqa: E402
from tests.integration.loss_recorder import read_losses  # noqa: E402
from tests.integration.training_runs import final_losses, run_fit, start_fit, wait_for_step, write_tiny_recipe  # noqa: E402

METRICS = (
    "eval/tiny_last_word/acc",
    "eval/tiny_last_word/acc_norm",
    "eval/tiny_next_line/acc",
    "eval/tiny_next_line/acc_norm",
    "eval/tiny_perplexity/word_perplexity",
    "eval/tiny_perplexity/byte_perplexity",
    "eval/tiny_perplexity/bits_per_byte",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return train_tiny_run(tmp_path_factory.mktemp("callback"), max_steps=3)


def _callback(run: TinyRun, **settings: Any) -> dict[str, Any]:
    init_args = {"every_n_steps": 2, "tasks": ["tiny"], "include_path": [str(run.tasks_dir)], "limit": 4, **settings}
    return {"class_path": "sdmoe_train.lightning.callbacks.DownstreamEvaluation", "init_args": init_args}


def _recipe_with(run: TinyRun, tmp_path: Path, callbacks: list[dict[str, Any]], max_steps: int = 5) -> Path:
    recipe = yaml.safe_load(run.recipe.read_text())
    run_dir = tmp_path / "run"
    recipe["trainer"].update(max_steps=max_steps, default_root_dir=str(run_dir), callbacks=callbacks)
    recipe["trainer"]["logger"] = [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir / name)}}
        for name in ("first", "second")
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _logged(*metrics_csvs: Path) -> dict[str, dict[int, float]]:
    """eval/ metrics by step over the given CSV logs (e.g. every attempt of a resumed run); none twice."""
    values: dict[str, dict[int, float]] = {}
    for metrics_csv in metrics_csvs:
        with metrics_csv.open() as stream:
            for row in csv.DictReader(stream):
                for name, value in row.items():
                    if name.startswith("eval/") and value:
                        assert int(row["step"]) not in values.setdefault(name, {}), f"{name} logged twice"
                        values[name][int(row["step"])] = float(value)
    return values


def _attempt_logs(run_dir: Path) -> list[Path]:
    """The CLI's per-attempt CSV logs of a run directory, oldest first."""
    logs = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda path: int(path.parent.name.split("_")[1]))
    assert logs, f"no CSV log under {run_dir / 'logs'}"
    return logs


def test_the_callback_logs_every_task_metric_to_every_logger_at_its_steps_and_at_the_end(
    run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["fit", "--config", str(_recipe_with(run, tmp_path, [_callback(run)]))])
    for logger in ("first", "second"):
        (metrics_csv,) = (tmp_path / "run" / logger).rglob("metrics.csv")
        logged = _logged(metrics_csv)
        assert sorted(logged) == sorted(METRICS)
        for values in logged.values():
            assert sorted(values) == [2, 4, 5]  # every 2 steps, and the end of training (step 5)
        assert all(0.0 <= value <= 1.0 for value in logged["eval/tiny_next_line/acc"].values())
    main(["report", str(tmp_path / "run" / "first"), "--out", str(tmp_path / "report.html")])
    page = (tmp_path / "report.html").read_text()
    assert "Downstream evaluation (lm-eval)" in page and "eval/tiny_next_line/acc_norm" in page
    assert "eval/tiny_next_line/acc_stderr" not in page


def test_evaluating_inside_training_leaves_random_states_weights_gradients_and_mode_untouched(
    run: TinyRun, tmp_path: Path
) -> None:
    probe = "tests.integration.evaluation_runs.StateProbe"
    callbacks = [
        {"class_path": probe, "init_args": {"role": "record"}},
        _callback(run, every_n_steps=1, limit=2, at_train_end=False),
        {"class_path": probe, "init_args": {"role": "check"}},
    ]
    StateProbe.differences.clear()
    StateProbe.checked_steps.clear()
    main(["fit", "--config", str(_recipe_with(run, tmp_path, callbacks, max_steps=3))])
    assert StateProbe.checked_steps == [1, 2, 3]
    assert StateProbe.differences == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"every_n_steps": 0}, "every_n_steps=0"),
        ({"limit": 0}, "limit=0"),
        ({"distributed": "all"}, "'split' or 'rank_zero'"),
    ],
)
def test_bad_settings_are_config_errors(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DownstreamEvaluation(**settings)


def test_an_unknown_task_fails_before_training_starts(
    run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe_with(run, tmp_path, [_callback(run, tasks=["tiny_next_lin"])])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe)])
    assert exit_info.value.code == 2
    assert "unknown task(s): 'tiny_next_lin'" in capsys.readouterr().err
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def _subprocess_recipe(tmp_path: Path, run: TinyRun, devices: int, with_callback: bool, **settings: Any) -> Path:
    """The bitwise-reproducible subprocess recipe of the resume tests, routing with a capacity limit (which
    the evaluation lifts and must put back), optionally with the callback."""
    recipe_path = write_tiny_recipe(tmp_path, max_steps=9, devices=devices, every_n_steps=2)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"]["arch"]["moe"]["capacity_factor"] = 1.0
    recipe["trainer"]["logger"] = True  # the CLI's CSV logger: <run dir>/logs/version_N/, one per attempt
    if with_callback:
        recipe["trainer"]["callbacks"].append(_callback(run, every_n_steps=3, limit=3, **settings))
    recipe_path.write_text(yaml.safe_dump(recipe))
    return recipe_path


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2], ids=["1proc", "2proc_ddp_split"])
def test_training_losses_are_bitwise_the_same_with_the_callback_and_after_a_resume(
    run: TinyRun, tmp_path: Path, devices: int
) -> None:
    reference = _subprocess_recipe(tmp_path / "reference", run, devices, with_callback=False)
    assert run_fit(reference, tmp_path / "reference.log") == 0, (tmp_path / "reference.log").read_text()[-3000:]
    expected = final_losses(tmp_path / "reference" / "run" / "losses_rank0.txt")
    assert sorted(expected) == list(range(1, 10))

    evaluated = _subprocess_recipe(tmp_path / "evaluated", run, devices, with_callback=True)
    log = tmp_path / "evaluated.log"
    assert run_fit(evaluated, log) == 0, log.read_text()[-3000:]
    assert final_losses(tmp_path / "evaluated" / "run" / "losses_rank0.txt") == expected
    logged = _logged(*_attempt_logs(tmp_path / "evaluated" / "run"))
    assert sorted(logged) == sorted(METRICS) and all(sorted(steps) == [3, 6, 9] for steps in logged.values())

    # Killed after the evaluation of step 6, resumed from the checkpoint of step 6: still the same losses.
    interrupted = _subprocess_recipe(tmp_path / "interrupted", run, devices, with_callback=True)
    losses = tmp_path / "interrupted" / "run" / "losses_rank0.txt"
    process = start_fit(interrupted, tmp_path / "interrupted.log")
    wait_for_step(losses, 7, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert max(step for step, _ in read_losses(losses)) < 9
    assert run_fit(interrupted, tmp_path / "interrupted.log") == 0, (tmp_path / "interrupted.log").read_text()[-3000:]
    assert final_losses(losses) == expected
    resumed = _logged(_attempt_logs(tmp_path / "interrupted" / "run")[-1])
    assert sorted(resumed) == sorted(METRICS)
    assert all(sorted(steps) == [9] for steps in resumed.values())  # step 6 is not evaluated again


@pytest.mark.slow
def test_rank_zero_and_split_evaluations_of_a_ddp_run_log_the_same_metrics(run: TinyRun, tmp_path: Path) -> None:
    logged = {}
    for distributed in ("split", "rank_zero"):
        recipe = _subprocess_recipe(tmp_path / distributed, run, 2, with_callback=True, distributed=distributed)
        log = tmp_path / f"{distributed}.log"
        assert run_fit(recipe, log) == 0, log.read_text()[-3000:]
        logged[distributed] = _logged(*_attempt_logs(tmp_path / distributed / "run"))
    assert sorted(logged["split"]) == sorted(METRICS)
    for name, values in logged["split"].items():
        assert sorted(values) == [3, 6, 9]
        assert logged["rank_zero"][name] == pytest.approx(values, rel=1e-6), name
