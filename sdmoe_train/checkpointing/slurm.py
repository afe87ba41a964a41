"""Requeueing the current Slurm job, and releasing it from Slurm's BeginTime hold.

Slurm leaves a requeued job pending with ``Reason=BeginTime`` for about 120 s, and ``scontrol update
StartTime=now`` only takes effect once the job really is PENDING, which happens after this job's
processes have exited. The release therefore cannot run inside the job: :func:`requeue_slurm_job`
submits it as a separate one-CPU job that waits for PENDING and releases, so it survives the requeue.
``sdmoe-train requeue JOB_ID`` runs the same from a batch script.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess

log = logging.getLogger(__name__)


def current_slurm_job() -> str | None:
    """The id ``scontrol`` knows this job by (``ARRAYID_TASK`` for array tasks), or None outside Slurm."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


RELEASE_POLL_SECONDS = 2
RELEASE_TIMEOUT_SECONDS = 600
RELEASE_SETTLE_SECONDS = 10
"""Wait after the job turned PENDING before releasing it. slurmd revokes the old run's credential at
one-second resolution, and a relaunch within that second fails with "Job credential revoked" and
ends the job for good (measured: released at once, the requeued job died); 10 s is well clear of it."""


def release_command(job_id: str) -> str:
    """Shell loop that waits until ``job_id`` is PENDING and then lifts its ~120 s BeginTime hold."""
    job = shlex.quote(job_id)
    attempts = RELEASE_TIMEOUT_SECONDS // RELEASE_POLL_SECONDS
    return (
        f"for attempt in $(seq {attempts}); do "
        f'if [ "$(squeue -h -j {job} -o %T)" = PENDING ]; then '
        f"sleep {RELEASE_SETTLE_SECONDS}; exec scontrol update JobId={job} StartTime=now; fi; "
        f"sleep {RELEASE_POLL_SECONDS}; done; exit 1"
    )


def requeue_slurm_job(job_id: str, release: bool = True) -> None:
    """Requeues a Slurm job (``scontrol requeue``) and, optionally, submits the job that releases it.

    Args:
        job_id: The job to requeue (normally :func:`current_slurm_job`).
        release: Submit a one-CPU job that waits until ``job_id`` is pending and runs
            ``scontrol update JobId=... StartTime=now``; without it the job waits about 120 s.

    Raises:
        subprocess.CalledProcessError: If ``scontrol requeue`` fails (the job was not submitted with
            ``--requeue``, or the cluster forbids requeueing).
    """
    if release:
        submit = ["sbatch", "--parsable", f"--job-name=release-{job_id}", "--ntasks=1", "--cpus-per-task=1"]
        submit += ["--mem=100M", "--time=00:15:00", "--output=/dev/null", "--no-requeue"]
        for option, variable in (("--partition", "SLURM_JOB_PARTITION"), ("--account", "SLURM_JOB_ACCOUNT")):
            if os.environ.get(variable):
                submit.append(f"{option}={os.environ[variable]}")
        submit.append(f"--wrap={release_command(job_id)}")
        result = subprocess.run(submit, capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            log.info("submitted job %s to release job %s once it is pending", result.stdout.strip(), job_id)
        else:
            # Not fatal: the requeued job still starts, only after Slurm's BeginTime delay.
            log.warning("could not submit the release job (%s); job %s waits ~120 s", result.stderr.strip(), job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
    log.info("requeued Slurm job %s", job_id)
