"""Preemption signals as flags, and requeueing the current Slurm job.

A signal handler here only records which signal arrived. Saving inside the handler would run
collectives and file writes at an arbitrary point of the training step, which is known to deadlock
data-parallel runs; instead :class:`~sdmoe_train.lightning.callbacks.PreemptionHandler` polls the
flags at the next optimizer-step boundary, where all ranks agree and save together.

Slurm leaves a requeued job pending with ``Reason=BeginTime`` for about 120 s, and ``scontrol update
StartTime=now`` only takes effect once the job really is PENDING, which happens after this job's
processes have exited. The release therefore cannot run inside the job: :func:`requeue_slurm_job`
submits it as a separate one-CPU job that waits for PENDING and releases, so it survives the requeue.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_received: dict[int, int] = {}
"""Signal number -> times received since :func:`install_signal_flags` (written by the handler only)."""


def _record(signum: int, frame: FrameType | None) -> None:
    # Runs between two bytecodes of the main thread: no locks, no I/O, no collectives.
    _received[signum] = _received.get(signum, 0) + 1


def parse_signal(name: str) -> signal.Signals:
    """The signal called ``name`` (``"USR1"``, ``"SIGUSR1"``; case-insensitive).

    Raises:
        ValueError: For an unknown name, listing the usual choices.
    """
    key = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(f"unknown signal {name!r}; use e.g. SIGUSR1, SIGUSR2, SIGTERM or SIGINT") from None


def install_signal_flags(signals: list[signal.Signals]) -> dict[signal.Signals, Any]:
    """Makes each signal set a flag instead of running its default action (usually: terminate).

    Returns:
        The handlers that were replaced, for :func:`restore_signal_handlers`.
    """
    previous = {}
    for signum in signals:
        current = signal.getsignal(signum)
        if current is not _record:
            previous[signum] = current
            signal.signal(signum, _record)
    return previous


def restore_signal_handlers(previous: dict[signal.Signals, Any]) -> None:
    """Puts back handlers returned by :func:`install_signal_flags` and forgets those signals' flags.

    None stands for a handler installed outside Python; it becomes the default action.
    """
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _received.pop(signum, None)


def signal_flags_installed(signum: signal.Signals) -> bool:
    """Whether ``signum`` currently only sets a flag."""
    return signal.getsignal(signum) is _record


def received(signum: signal.Signals) -> bool:
    """Whether ``signum`` arrived since its flag was installed."""
    return _received.get(signum, 0) > 0


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


def main(argv: list[str] | None = None) -> None:
    """``python -m sdmoe_train.preemption requeue JOB_ID``: requeue plus release, for batch scripts."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdmoe_train.preemption")
    parser.add_argument("command", choices=["requeue"])
    parser.add_argument("job_id", help="the Slurm job id (ARRAYID_TASK for an array task)")
    parser.add_argument("--no_release", action="store_true", help="leave the ~120 s BeginTime hold in place")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    requeue_slurm_job(args.job_id, release=not args.no_release)


if __name__ == "__main__":
    main()
