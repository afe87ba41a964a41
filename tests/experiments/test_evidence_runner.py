"""The evidence study's training runner: run records, halted runs, reruns, and metrics kept across attempts."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import evidence_runner
import pytest
from evidence_report import read_scalars
from evidence_runner import HALT_MESSAGE, Job, keep_earlier_metrics, read_record, run_jobs


def _fake_trainer(tmp_path: Path, body: str) -> str:
    """An executable standing in for ``sdmoe-train``: runs ``body`` with the recipe path in $3."""
    script = tmp_path / "fake-sdmoe-train"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def _job(tmp_path: Path, name: str) -> Job:
    return Job(f"{name}/seed_1", tmp_path / "runs" / name / "seed_1", {"seed_everything": 1, "name": name})


def test_runs_are_recorded_once_and_only_finished_or_halted_runs_count_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls.txt"
    body = f"""echo "$3" >> {calls}
case "$3" in
  */ok/*) echo trained; exit 0;;
  */halted/*) echo "{HALT_MESSAGE} loss not finite"; exit 1;;
  *) mkdir -p "$(dirname "$3")/logs"; echo "step,val/loss" > "$(dirname "$3")/logs/metrics.csv"; exit 1;;
esac"""
    trainer = _fake_trainer(tmp_path, body)
    monkeypatch.setattr(evidence_runner, "sdmoe_train_executable", lambda: trainer)
    jobs = [_job(tmp_path, name) for name in ("ok", "halted", "crashed")]

    records = run_jobs(jobs, parallel=2, threads=1)

    assert records["ok/seed_1"]["returncode"] == 0 and not records["ok/seed_1"]["halted"]
    assert records["halted/seed_1"]["halted"], "a diverged run is a result of the study"
    assert records["crashed/seed_1"]["returncode"] == 1 and not records["crashed/seed_1"]["halted"]
    assert read_record(jobs[0].run_dir) == json.loads(json.dumps(records["ok/seed_1"]))
    assert read_record(jobs[1].run_dir) is not None
    assert read_record(jobs[2].run_dir) is None, "a crashed run must be retried on the next start"
    assert "trained" in (jobs[0].run_dir / "train.log").read_text()
    assert records["ok/seed_1"]["threads"] == 1
    recipe_text = (jobs[0].run_dir / "recipe.yaml").read_text()
    assert "seed_everything: 1" in recipe_text

    run_jobs(jobs, parallel=2, threads=1)
    trained = calls.read_text().split()
    assert sum("/ok/" in path for path in trained) == 1, "a finished run is not trained again"
    assert sum("/halted/" in path for path in trained) == 1
    assert sum("/crashed/" in path for path in trained) == 2
    # The retry's logger would delete the crashed attempt's metrics; the runner moved them aside first.
    assert (jobs[2].run_dir / "earlier_attempts" / "attempt_1" / "metrics.csv").is_file()


def _write_metrics(path: Path, rows: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step,val/loss\n" + "".join(f"{step},{value}\n" for step, value in rows))


def test_an_interrupted_attempts_metrics_are_kept_and_joined_with_the_resumed_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert keep_earlier_metrics(run_dir) is None
    _write_metrics(run_dir / "logs" / "metrics.csv", [(49, 5.0), (99, 4.0), (149, 3.5)])
    first = keep_earlier_metrics(run_dir)
    assert first == run_dir / "earlier_attempts" / "attempt_1" / "metrics.csv"
    assert not (run_dir / "logs" / "metrics.csv").exists()
    # The second attempt resumed from the step-100 checkpoint: its step 149 replaces the first attempt's.
    _write_metrics(run_dir / "logs" / "metrics.csv", [(149, 3.4), (199, 3.0)])
    second = keep_earlier_metrics(run_dir)
    assert second == run_dir / "earlier_attempts" / "attempt_2" / "metrics.csv"
    _write_metrics(run_dir / "logs" / "metrics.csv", [(199, 2.9), (249, 2.8)])

    assert read_scalars(run_dir)["val/loss"] == [(49, 5.0), (99, 4.0), (149, 3.4), (199, 2.9), (249, 2.8)]


def test_a_run_that_never_logged_has_no_scalars(tmp_path: Path) -> None:
    assert read_scalars(tmp_path / "run") == {}
