"""The run-directory lock: a second run refuses, a killed run's lock does not block, a requeue takes it over."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdmoe_train.checkpointing.run_lock import LOCK_FILE, acquire_run_lock
from sdmoe_train.errors import ConfigError

HOLD = (
    "import sys, time; from sdmoe_train.checkpointing.run_lock import acquire_run_lock; "
    "acquire_run_lock(sys.argv[1]); print('locked', flush=True); time.sleep(60)"
)


def _holder(run_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_a_locked_directory_refuses_naming_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on ") as error:
            acquire_run_lock(tmp_path)
        assert "--trainer.default_root_dir" in str(error.value) and LOCK_FILE in str(error.value)
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).is_file(), "SIGKILL leaves the lock file behind; the test proves nothing"
    with caplog.at_level(logging.WARNING):
        lock = acquire_run_lock(tmp_path)
    assert "taking over the lock" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_run_lock(tmp_path).release()  # released: the same process can lock again


def _foreign_lock(run_dir: Path, **fields: object) -> None:
    record = {"host": "some-other-node", "pid": 4242, "slurm_job": None, "slurm_restart": 0, "started": time.time()}
    (run_dir / LOCK_FILE).write_text(json.dumps({**record, **fields}))


def test_a_lock_from_another_host_refuses_and_says_how_to_proceed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(variable, raising=False)
    _foreign_lock(tmp_path)
    with pytest.raises(ConfigError, match=r"pid 4242 on some-other-node.*if that run is gone, delete"):
        acquire_run_lock(tmp_path)


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_incarnation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _foreign_lock(tmp_path, slurm_job="777", slurm_restart=0)
    acquire_run_lock(tmp_path).release()
    # The same incarnation on another node is a second job step, not a requeue: it must refuse.
    _foreign_lock(tmp_path, slurm_job="777", slurm_restart=1)
    with pytest.raises(ConfigError, match="in use by another run"):
        acquire_run_lock(tmp_path)


def test_a_run_directory_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=rf"cannot write the run directory '{blocker / 'run'}'"):
        acquire_run_lock(blocker / "run")
