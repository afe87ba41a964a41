"""A real Slurm: submit short training jobs, deliver the pre-timeout signal, and check that each job saves,
requeues itself, is released from Slurm's BeginTime hold, resumes and finishes. The single-node job runs
``slurm/single_node.sbatch``; the two-node job ``slurm/multi_node.sbatch`` with expert parallelism over the
nodes under DeepSpeed ZeRO-2, and must end with the per-step losses of an uninterrupted job, bit for bit.

Needs slurmctld + slurmd on this machine; one command sets up two emulated nodes and runs these tests:
``make test-slurm`` (``slurm/install_local_slurm.sh install 2 && ... start``, then pytest).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.loss_recorder import read_losses
from tests.integration.training_runs import REPO, final_losses, subprocess_env, write_tiny_recipe

MAX_STEPS = 300


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0


def _slurm_nodes() -> int:
    if not _slurm_up():
        return 0
    return len(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()))


def _job_field(job_id: str, field: str) -> str | None:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else None


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no Slurm here; run `make test-slurm` (installs a local one)")
@pytest.mark.parametrize("signal_at_step", [20, 0], ids=["mid_training", "at_job_start"])
def test_signalled_job_saves_requeues_resumes_and_finishes(tmp_path: Path, signal_at_step: int) -> None:
    """``signal_at_step=0`` sends the signal as soon as the job runs, before Python has started: the
    earliest a coarse Slurm timer can deliver it. Then the batch shell requeues (nothing to save yet)."""
    recipe = write_tiny_recipe(tmp_path, max_steps=MAX_STEPS, every_n_steps=50)
    run_dir = tmp_path / "run"
    log = tmp_path / "slurm.out"
    env = {**subprocess_env(), "PYTHON": sys.executable}
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--cpus-per-task=1", "--time=10", f"--output={log}",
            str(REPO / "slurm" / "single_node.sbatch"), str(recipe), "--validate_before_fit=false",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        losses = run_dir / "losses_rank0.txt"
        if signal_at_step:
            _wait(lambda: any(step >= signal_at_step for step, _ in read_losses(losses)), 180, "the signal step")
        else:
            # RUNNING is the allocation; a signal sent before slurmd has started the batch shell is dropped by
            # Slurm (measured: the job then trained to the end). launch.sh prints this line once its trap is set.
            started = f"job {job_id} restart 0:"
            _wait(lambda: log.is_file() and started in log.read_text(), 60, "the batch shell to start")
        # What `--signal=B:USR1@SECONDS` does before the time limit, delivered now.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        signalled = time.monotonic()
        _wait(lambda: (_job_field(job_id, "Restarts") or "0") != "0", 120, "the requeue")
        _wait(lambda: _job_field(job_id, "JobState") in ("RUNNING", "COMPLETED"), 200, "the requeued job to start")
        restarted_after = time.monotonic() - signalled
        _wait(lambda: _job_field(job_id, "JobState") == "COMPLETED", 300, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    output = log.read_text()
    assert "batch shell got SIGUSR1" in output
    assert re.search(r"restart 1:", output), output[-3000:]
    if signal_at_step:
        assert "resuming from" in output, output[-3000:]
    # Without the release job the requeued job would wait ~120 s in Reason=BeginTime.
    assert restarted_after < 110, f"requeued job started {restarted_after:.0f} s after the signal"
    saved = re.search(r"preemption signal: saving step (\d+), then requeue", output)
    if signal_at_step:
        assert saved is not None and signal_at_step <= int(saved.group(1)) < MAX_STEPS, output[-3000:]
    else:  # Python was not up yet (the shell requeued), it stopped before training, or it saved at its first step
        stopped_early = "stopped before training: SIGUSR1 received" in output
        assert "requeueing it from the batch shell" in output or stopped_early or saved is not None, output[-3000:]
    steps = [step for step, _ in read_losses(run_dir / "losses_rank0.txt")]
    assert set(steps) == set(range(1, MAX_STEPS + 1))
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == MAX_STEPS
    print(f"requeued job restarted {restarted_after:.1f} s after the signal")


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no Slurm here; run `make test-slurm` (installs a local one)")
def test_a_job_signalled_while_it_tokenizes_requeues_itself_at_once_and_finishes(tmp_path: Path) -> None:
    """The first attempt tokenizes for ten minutes per batch (two worker processes); USR1 must end that at
    once, the tasks requeue the job themselves (exit 0), and the next attempt prepares the data and trains."""
    max_steps = 20
    recipe = write_tiny_recipe(tmp_path, max_steps=max_steps, every_n_steps=10)
    shutil.rmtree(tmp_path / "cache")
    markers = tmp_path / "markers"
    markers.mkdir()
    python = tmp_path / "python"
    # launch.sh runs `$PYTHON -m sdmoe_train.cli fit ...`; only the first attempt tokenizes slowly.
    python.write_text(
        "#!/bin/sh\n"
        f'if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then shift 2; exec {sys.executable} -m '
        'tests.integration.slow_tokenizing "$@"; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    log = tmp_path / "slurm.out"
    env = {**subprocess_env(), "PYTHON": str(python), "SLOW_TOKENIZING_DIR": str(markers)}
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--cpus-per-task=1", "--time=10", f"--output={log}",
            str(REPO / "slurm" / "single_node.sbatch"), str(recipe), "--validate_before_fit=false",
            "--data.corpus.num_proc=2",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        _wait(lambda: len(list(markers.iterdir())) == 2, 180, "both tokenizing workers")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        signalled = time.monotonic()
        _wait(lambda: (_job_field(job_id, "Restarts") or "0") != "0", 60, "the requeue")
        requeued_after = time.monotonic() - signalled
        _wait(lambda: _job_field(job_id, "JobState") == "COMPLETED", 300, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    output = log.read_text()
    assert "stopped before training: SIGUSR1 received: data preparation interrupted" in output, output[-3000:]
    assert "training step exited with status 0" in output and "from the batch shell" not in output, output[-3000:]
    assert re.search(r"restart 1:", output) and "resuming from" not in output, output[-3000:]
    assert [step for step, _ in read_losses(tmp_path / "run" / "losses_rank0.txt")] == list(range(1, max_steps + 1))
    print(f"requeued {requeued_after:.1f} s after the signal")


def _submit_two_node_job(recipe: Path, log: Path) -> str:
    # Emulated nodes share this machine, and their names do not resolve: the rendezvous address is given.
    env = {**subprocess_env(), "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1"}
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1",
            "--time=15", f"--output={log}", str(REPO / "slurm" / "multi_node.sbatch"), str(recipe),
        ],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return submitted.stdout.strip().split(";")[0]


@pytest.mark.slow
@pytest.mark.skipif(_slurm_nodes() < 2, reason="needs a Slurm with 2 nodes; `make test-slurm` emulates them here")
def test_two_node_job_requeues_and_resumes_to_the_losses_of_an_uninterrupted_job(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from tests.integration.test_multi_node import _recipe

    max_steps = 40
    jobs = {}
    for name in ("reference", "preempted"):
        recipe = _recipe(tmp_path / name)
        recipe.write_text(recipe.read_text().replace("max_steps: 10", f"max_steps: {max_steps}"))
        jobs[name] = _submit_two_node_job(recipe, tmp_path / f"{name}.out")
        if name == "reference":
            _wait(lambda: _job_field(jobs["reference"], "JobState") == "COMPLETED", 600, "the reference job")
    job_id, run_dir = jobs["preempted"], tmp_path / "preempted" / "run"
    try:
        _wait(lambda: any(step >= 8 for step, _ in read_losses(run_dir / "losses_rank1.txt")), 300, "step 8")
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        _wait(lambda: (_job_field(job_id, "Restarts") or "0") != "0", 120, "the requeue")
        _wait(lambda: _job_field(job_id, "JobState") == "COMPLETED", 600, "the requeued job to finish")
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    output = (tmp_path / "preempted.out").read_text()
    assert "2 node(s) x 1 task(s)" in output and "restart 1:" in output and "resuming from" in output
    saved = re.findall(r"preemption signal: saving step (\d+), then requeue", output)
    assert len(saved) == 2 and len(set(saved)) == 1, saved  # both nodes stopped at the same step
    for rank in (0, 1):
        expected = final_losses(tmp_path / "reference" / "run" / f"losses_rank{rank}.txt")
        assert sorted(expected) == list(range(1, max_steps + 1))
        assert final_losses(run_dir / f"losses_rank{rank}.txt") == expected, rank
