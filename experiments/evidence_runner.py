"""Runs the study's training jobs: one ``sdmoe-train fit`` process per (arm, seed), a few at a time.

Each run writes its recipe, log and a ``run.json`` record (exit status, wall and CPU seconds) into its own
directory. A run with a successful record is skipped when the study is started again; an interrupted one
continues from its newest periodic checkpoint (``sdmoe-train fit`` resumes automatically). Every attempt
logs to its own ``logs/version_N`` folder of the run directory (the CLI's default logger), which
:func:`sdmoe_train.report.dashboard.read_run` joins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from sdmoe_train.io import write_json_atomically, write_text_atomically

EXPERIMENTS_DIR = Path(__file__).resolve().parent
RECORD_FILE = "run.json"
HALT_MESSAGE = "sdmoe-train: training stopped:"
"""What ``sdmoe-train fit`` prints when NonFiniteGuard stops a run whose loss keeps being non-finite."""


@dataclass(frozen=True)
class Job:
    """One training process."""

    run_id: str
    """``<arm>/seed_<n>``."""
    run_dir: Path
    """Its directory."""
    recipe: dict
    """Its complete ``sdmoe-train fit`` recipe."""


def sdmoe_train_executable() -> str:
    """The ``sdmoe-train`` script of the running interpreter's environment (so that runs use this checkout)."""
    candidate = Path(sys.executable).parent / "sdmoe-train"
    return str(candidate) if candidate.is_file() else "sdmoe-train"


def read_record(run_dir: Path) -> dict | None:
    """The run's ``run.json``, or None when it never finished."""
    path = run_dir / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def run_job(job: Job, threads: int) -> dict:
    """Train one run to completion (or to a halt) and record how it went.

    Args:
        job: what to train.
        threads: intra-op threads of the process (``OMP_NUM_THREADS``; torch follows it).

    Returns:
        The record written to ``run.json``: ``returncode``, ``wall_seconds``, ``cpu_seconds``, ``halted``.
    """
    job.run_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = job.run_dir / "recipe.yaml"
    write_text_atomically(recipe_path, yaml.safe_dump(job.recipe, sort_keys=False))
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(EXPERIMENTS_DIR), os.environ.get("PYTHONPATH")])),
    }
    command = [sdmoe_train_executable(), "fit", "--config", str(recipe_path)]
    load_at_start = os.getloadavg()
    log_path = job.run_dir / "train.log"
    earlier_output = log_path.stat().st_size if log_path.is_file() else 0
    started = time.perf_counter()
    with log_path.open("a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        _, status, usage = os.wait4(process.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    with log_path.open(errors="replace") as log:
        log.seek(earlier_output)
        log_text = log.read()
    record = {
        "run_id": job.run_id,
        "returncode": returncode,
        # NonFiniteGuard's stop (a diverged run) is a result of the study, not a failure to rerun.
        "halted": HALT_MESSAGE in log_text,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "threads": threads,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
    }
    if returncode == 0 or record["halted"]:
        write_json_atomically(job.run_dir / RECORD_FILE, record)
    return record


def run_jobs(jobs: list[Job], parallel: int, threads: int) -> dict[str, dict]:
    """Train every job that has no record yet, ``parallel`` at a time; print one line per finished run.

    Returns:
        run id -> record (also for runs skipped because they had finished before).
    """
    records = {job.run_id: record for job in jobs if (record := read_record(job.run_dir)) is not None}
    pending = [job for job in jobs if job.run_id not in records]
    print(f"{len(records)} runs already done, {len(pending)} to train ({parallel} at a time, {threads} thread each)")
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for job, record in zip(pending, pool.map(lambda job: run_job(job, threads), pending), strict=True):
            records[job.run_id] = record
            status = "ok" if record["returncode"] == 0 else ("halted" if record["halted"] else "FAILED")
            print(
                f"{job.run_id:28s} {status:6s} wall {record['wall_seconds']:7.0f} s  "
                f"cpu {record['cpu_seconds']:7.0f} s  load {record['load_average_at_end'][0]:.1f}",
                flush=True,
            )
    return records
