"""`scancel` while `fit` or `prepare` tokenizes with worker processes: a prompt, clean stop that keeps no partial
cache, and a next run that completes (slow: each case starts `sdmoe-train` twice in a subprocess)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.training_runs import REPO, fit_command, subprocess_env, write_tiny_recipe

pytestmark = pytest.mark.slow

NUM_PROC = 2
PROMPT_SECONDS = 20
"""How soon the process must exit after the signal (tokenizing alone would take ten minutes)."""


def _start_slow(markers: Path, command: list[str], log: Path) -> subprocess.Popen:
    markers.mkdir()
    script = [sys.executable, "-m", "tests.integration.slow_tokenizing", *command]
    environment = {**subprocess_env(), "SLOW_TOKENIZING_DIR": str(markers)}
    with open(log, "wb") as output:
        return subprocess.Popen(
            script, cwd=REPO, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for_workers(markers: Path, process: subprocess.Popen, log: Path) -> list[int]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        started = [int(path.name) for path in markers.iterdir()]
        if len(started) == NUM_PROC:
            return started
        assert process.poll() is None, f"exited with {process.returncode} before tokenizing:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"{NUM_PROC} tokenizing workers did not start within 300 s")


def _exit_code_soon(process: subprocess.Popen, log: Path) -> int:
    """The exit code of ``process`` if it ends within :data:`PROMPT_SECONDS`; else it is killed and the test fails."""
    try:
        return process.wait(timeout=PROMPT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"still running {PROMPT_SECONDS} s after SIGTERM:\n{log.read_text()}") from None


def _run_to_the_end(command: list[str]) -> str:
    """Runs ``command`` (tokenizing at full speed) and returns its output; it must succeed."""
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("whom", "devices"), [("process_group", 1), ("main_process", 1), ("process_group", 2)], ids=["group", "main", "ddp"]
)
def test_scancel_while_fit_tokenizes_stops_within_seconds_and_a_rerun_completes(
    tmp_path: Path, whom: str, devices: int
) -> None:
    # With 2 DDP ranks, rank 1 waits in Lightning's barrier while rank 0 tokenizes; both must stop together.
    recipe = write_tiny_recipe(tmp_path, max_steps=2, devices=devices)
    shutil.rmtree(tmp_path / "cache")
    log = tmp_path / "fit.log"
    command = ["fit", "--config", str(recipe), f"--data.corpus.num_proc={NUM_PROC}"]
    process = _start_slow(tmp_path / "markers", command, log)
    workers = _wait_for_workers(tmp_path / "markers", process, log)
    signalled = time.monotonic()
    # Slurm signals every process of the job step; `kill PID` only the one named.
    if whom == "process_group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        os.kill(process.pid, signal.SIGTERM)
    code = _exit_code_soon(process, log)
    output = log.read_text()
    assert code == 0, output  # the exit code of a run a signal stopped during training
    # Every rank says so: none failed in a collective that another had left.
    assert output.count("stopped before training: SIGTERM received: data preparation interrupted") == devices
    print(f"exited {time.monotonic() - signalled:.1f} s after SIGTERM")
    assert not any(_is_running(pid) for pid in workers), "a tokenizing worker outlived the run"
    assert list((tmp_path / "cache").iterdir()) == [], "a partial token cache was left behind"
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists(), "the run trained after the signal"

    _run_to_the_end([*fit_command(recipe), f"--data.corpus.num_proc={NUM_PROC}"])
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


def test_scancel_while_prepare_tokenizes_exits_143_and_a_rerun_completes(tmp_path: Path) -> None:
    recipe = write_tiny_recipe(tmp_path, max_steps=2)
    shutil.rmtree(tmp_path / "cache")
    log = tmp_path / "prepare.log"
    process = _start_slow(
        tmp_path / "markers", ["prepare", "--config", str(recipe), f"--data.corpus.num_proc={NUM_PROC}"], log
    )
    workers = _wait_for_workers(tmp_path / "markers", process, log)
    os.kill(process.pid, signal.SIGTERM)
    code = _exit_code_soon(process, log)
    output = log.read_text()
    assert code == 128 + signal.SIGTERM, output  # as a shell reports a command a signal ended
    assert "SIGTERM received: data preparation interrupted" in output
    assert not any(_is_running(pid) for pid in workers), "a tokenizing worker outlived prepare"
    assert list((tmp_path / "cache").iterdir()) == [], "a partial token cache was left behind"

    rerun = _run_to_the_end([sys.executable, "-m", "sdmoe_train.cli", "prepare", "--config", str(recipe)])
    assert "token cache of 'corpus' ready" in rerun
