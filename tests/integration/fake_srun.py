"""What ``srun`` does inside a multi-node Slurm job, on one machine: start SLURM_NNODES × tasks-per-node tasks.

Each task gets the environment a real job step gives it (``SLURM_PROCID``, ``SLURM_NODEID``, ``SLURM_LOCALID``,
``SLURM_NTASKS``, ``SLURM_STEP_NUM_TASKS``, ...), which is all Lightning's ``SLURMEnvironment`` reads to place
the task in the process group. Like ``srun`` it forwards SIGUSR1 and SIGTERM to every task,
``--kill-on-bad-exit=1`` ends the others when one fails, and it exits with the first non-zero task status.
Each task's pid is written to ``$FAKE_SRUN_PIDS/task_<PROCID>.pid`` so that a test can signal one "node".

    srun --kill-on-bad-exit=1 --ntasks-per-node=N COMMAND...    (the options slurm/launch.sh passes)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _parse(argv: list[str]) -> tuple[int, bool, list[str]]:
    tasks_per_node, kill_on_bad_exit = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1")), False
    while argv and argv[0].startswith("--"):
        option, _, value = argv.pop(0).partition("=")
        if option == "--ntasks-per-node":
            tasks_per_node = int(value)
        elif option == "--kill-on-bad-exit":
            kill_on_bad_exit = value != "0"
        else:
            raise SystemExit(f"fake srun: unsupported option {option}")
    return tasks_per_node, kill_on_bad_exit, argv


def main() -> int:
    tasks_per_node, kill_on_bad_exit, command = _parse(sys.argv[1:])
    nodes = int(os.environ["SLURM_NNODES"])
    num_tasks = nodes * tasks_per_node
    pid_dir = Path(os.environ["FAKE_SRUN_PIDS"])
    pid_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for rank in range(num_tasks):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_NODEID": str(rank // tasks_per_node),
            "SLURM_LOCALID": str(rank % tasks_per_node),
            "SLURM_NTASKS": str(num_tasks),
            "SLURM_NPROCS": str(num_tasks),
            "SLURM_STEP_NUM_TASKS": str(num_tasks),
            "SLURM_STEP_NUM_NODES": str(nodes),
            "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
            "SLURM_STEP_ID": "0",
        }
        task = subprocess.Popen(command, env=env)
        (pid_dir / f"task_{rank}.pid").write_text(str(task.pid))
        tasks.append(task)

    def forward(signum: int, frame: object) -> None:
        for task in tasks:
            if task.poll() is None:
                task.send_signal(signum)

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    status = 0
    while any(task.poll() is None for task in tasks):
        failed = [task.returncode for task in tasks if task.returncode not in (None, 0)]
        if failed and kill_on_bad_exit:
            for task in tasks:
                if task.poll() is None:
                    task.kill()
        time.sleep(0.2)
    for task in tasks:
        status = status or task.returncode
    return 0 if status == 0 else (status if status > 0 else 128 - status)


if __name__ == "__main__":
    sys.exit(main())
