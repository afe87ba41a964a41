"""Multi-node rehearsal on one machine: 2 "nodes" x 1 process, started by slurm/launch.sh as in a Slurm job.

``slurm/launch.sh`` runs with the environment ``sbatch`` gives a 2-node job; ``srun`` is
:mod:`tests.integration.fake_srun`, which starts one task per node with the step environment of a real
``srun`` (``SLURM_PROCID``, ``SLURM_NODEID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ...). Lightning's
``SLURMEnvironment`` places the tasks; they train with gloo under DeepSpeed ZeRO-2 with the experts split over
the two nodes (``ep_size=2``) and SD-MoE. A preemption signal delivered to the second node's process only
stops both at the same step with one checkpoint; the first node requeues the job (``scontrol``/``sbatch``
are recording stand-ins here); launching again resumes and finishes with the per-step losses of an
uninterrupted run, bit for bit. Needs the ``deepspeed`` extra.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sdmoe_train.checkpointing.manifest import read_manifest
from sdmoe_train.parallel.deepspeed import LAYOUT_KEY, rank_file
from tests.integration import fake_srun
from tests.integration.loss_recorder import read_losses
from tests.integration.training_runs import REPO, final_losses, subprocess_env, wait_for_step, write_tiny_recipe

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

MAX_STEPS = 10
JOB_ID = "5150"


def _recipe(tmp_path: Path) -> Path:
    path = write_tiny_recipe(tmp_path, max_steps=MAX_STEPS, every_n_steps=3)
    recipe = yaml.safe_load(path.read_text())
    recipe["validate_before_fit"] = False  # a DeepSpeed inference engine cannot be built on CPU
    recipe["model"]["parallel"] = {"ep_size": 2}
    recipe["trainer"]["strategy"] = {
        "class_path": "sdmoe_train.parallel.deepspeed.MoEDeepSpeedStrategy",
        "init_args": {"stage": 2},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _slurm_stand_ins(bin_dir: Path) -> Path:
    """``srun`` starting the tasks, and ``sbatch``/``scontrol`` that only record how they were called."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / "calls.log"
    scripts = {
        "srun": f'exec "{sys.executable}" "{fake_srun.__file__}" "$@"\n',
        "scontrol": f'echo "scontrol $*" >> "{calls}"\n',
        "sbatch": f'echo "sbatch $*" >> "{calls}"\necho 9999\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return calls


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(recipe: Path, work: Path, restart: int = 0) -> subprocess.Popen:
    """``slurm/launch.sh RECIPE`` as the batch shell of a 2-node job with one task per node."""
    env = {
        **subprocess_env(),
        "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "FAKE_SRUN_PIDS": str(work / "pids"),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NAME": "rehearsal",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_JOB_NODELIST": f"localhost,{socket.gethostname()}",
        "SLURM_NODELIST": f"localhost,{socket.gethostname()}",
        "SLURM_RESTART_COUNT": str(restart),
        "MASTER_PORT": str(_free_port()),
    }
    log = open(work / f"job_restart{restart}.log", "ab")  # noqa: SIM115 (closed when the process object goes)
    command = ["bash", str(REPO / "slurm" / "launch.sh"), str(recipe)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finished(process: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert returncode == 0, log.read_text()[-4000:]


def test_two_node_expert_parallel_zero2_job_survives_a_signal_to_one_node(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    _slurm_stand_ins(reference / "bin")
    _finished(_launch(_recipe(reference), reference), reference / "job_restart0.log")

    work = tmp_path / "preempted"
    calls = _slurm_stand_ins(work / "bin")
    recipe, run_dir = _recipe(work), work / "run"
    job = _launch(recipe, work)
    wait_for_step(run_dir / "losses_rank1.txt", 4, job, timeout=900)
    second_node_task = int((work / "pids" / "task_1.pid").read_text())
    os.kill(second_node_task, signal.SIGUSR1)  # what srun would forward to every node, to one node only
    _finished(job, work / "job_restart0.log")

    stopped_at = {rank: max(step for step, _ in read_losses(run_dir / f"losses_rank{rank}.txt")) for rank in (0, 1)}
    assert stopped_at[0] == stopped_at[1] < MAX_STEPS, stopped_at
    step = stopped_at[0]
    output = (work / "job_restart0.log").read_text()
    assert f"preemption signal: saving step {step}, then requeue" in output
    newest = read_manifest(run_dir / "checkpoints")[-1]
    assert newest["step"] == step
    checkpoint = run_dir / "checkpoints" / newest["name"]
    for rank in (0, 1):
        saved = torch.load(rank_file(checkpoint, rank), weights_only=False)
        assert saved["global_step"] == step
        assert saved[LAYOUT_KEY]["world_size"] == 2 and saved[LAYOUT_KEY]["ep_size"] == 2
        assert saved[LAYOUT_KEY]["ep_rank"] == rank and saved[LAYOUT_KEY]["sharded"]
    assert not list((run_dir / "checkpoints").glob(".*.partial"))
    recorded = calls.read_text().splitlines()
    assert [line for line in recorded if line.startswith("scontrol")] == [f"scontrol requeue {JOB_ID}"]
    assert any(line.startswith("sbatch") and f"release-{JOB_ID}" in line for line in recorded)

    _finished(_launch(recipe, work, restart=1), work / "job_restart1.log")  # the requeued job
    resumed_output = (work / "job_restart1.log").read_text()
    assert "restart 1:" in resumed_output and "resuming from" in resumed_output
    for rank in (0, 1):
        expected = final_losses(reference / "run" / f"losses_rank{rank}.txt")
        assert sorted(expected) == list(range(1, MAX_STEPS + 1))
        assert final_losses(run_dir / f"losses_rank{rank}.txt") == expected, rank
