"""The evidence study's training runner: run records, halted runs, reruns, and metrics joined across attempts."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import evidence_runner
import pytest
from evidence_report import read_scalars
from evidence_runner import HALT_MESSAGE, Job, read_record, run_jobs


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
  *) exit 1;;
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


def _write_attempt(run_dir: Path, version: int, rows: list[tuple[int, float]]) -> None:
    """One attempt's log where the CLI's default logger puts it, written ``version`` minutes after the first."""
    path = run_dir / "logs" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step,val/loss\n" + "".join(f"{step},{value}\n" for step, value in rows))
    os.utime(path, (1_000_000 + 60 * version, 1_000_000 + 60 * version))


def test_the_attempts_of_a_resumed_run_are_joined(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _write_attempt(run_dir, 0, [(49, 5.0), (99, 4.0), (149, 3.5)])
    # The second attempt resumed from the step-100 checkpoint: its step 149 replaces the first attempt's.
    _write_attempt(run_dir, 1, [(149, 3.4), (199, 3.0)])
    _write_attempt(run_dir, 2, [(199, 2.9), (249, 2.8)])

    assert read_scalars(run_dir)["val/loss"] == [(49, 5.0), (99, 4.0), (149, 3.4), (199, 2.9), (249, 2.8)]


def test_a_run_that_never_logged_has_no_scalars(tmp_path: Path) -> None:
    assert read_scalars(tmp_path / "run") == {}
