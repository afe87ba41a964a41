"""``sdmoe-train requeue``: requeue a Slurm job and release it from the BeginTime hold, for batch scripts.

``slurm/launch.sh`` calls it when the training tasks died before they could requeue the job themselves
(:class:`~sdmoe_train.checkpointing.preemption.PreemptionHandler` does it otherwise).
"""

from __future__ import annotations

import argparse
import logging
import subprocess

from sdmoe_train.checkpointing.slurm import requeue_slurm_job
from sdmoe_train.errors import ConfigError

USAGE = """\
  sdmoe-train requeue JOB_ID [--no_release]
      requeue a Slurm job and submit the tiny job that lifts its ~120 s BeginTime hold once it is pending
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdmoe-train requeue", description="Requeue a Slurm job (and release it).")
    parser.add_argument("job_id", help="the Slurm job id (ARRAYID_TASK for an array task)")
    parser.add_argument("--no_release", action="store_true", help="leave the ~120 s BeginTime hold in place")
    return parser


def run(argv: list[str]) -> None:
    """Run ``requeue`` with its arguments."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        requeue_slurm_job(args.job_id, release=not args.no_release)
    except FileNotFoundError as error:
        raise ConfigError(f"cannot requeue job {args.job_id}: {error.filename} is not installed here") from error
    except subprocess.CalledProcessError as error:
        raise ConfigError(
            f"scontrol could not requeue job {args.job_id!r}: {(error.stderr or '').strip() or error}; check the job "
            "id, and that the job was submitted with --requeue"
        ) from error
