"""One ``fit`` per run directory: a lock file that a second run refuses on and a killed run does not leave behind.

``<run_dir>/run.lock`` names the host, process id and Slurm job of the run holding it, and that process
keeps an exclusive ``flock`` on it while it lives. Only global rank 0 takes the lock: the other ranks of
the same run (DDP, expert parallelism, several nodes) write through rank 0 or into their own per-rank
files, so a lock per rank would only make the ranks of one run refuse each other.

A lock is *stale*, and is taken over with a warning, when

- it was written on this host and no process holds its ``flock`` (the run was killed: SIGKILL, out of
  memory; the kernel drops an ``flock`` with its process, so a reused process id cannot fool the check);
- or it was written by an earlier incarnation of this Slurm job (a requeue: same job id, lower
  ``SLURM_RESTART_COUNT``), on whatever node; Slurm ends every process of a job before requeueing it.

A lock written on another host by another job cannot be checked from here; the message names its
writer and says to delete the file once that run is known to be gone.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from sdmoe_train.checkpointing.slurm import current_slurm_job
from sdmoe_train.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
"""Lock file in the run directory."""


class RunLock:
    """The held lock of one run directory; :meth:`release` (also run at exit) deletes it."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Deletes the lock file and drops the ``flock``; a second call does nothing."""
        if self._descriptor is None:
            return
        try:
            if _lock_owner(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self._descriptor)
            self._descriptor = None


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Locks ``run_dir`` for this process (created if missing) until :meth:`RunLock.release` or exit.

    Raises:
        ConfigError: Another live run holds the directory, or the directory cannot be written.
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    descriptor, flocked = _open_and_flock(path)
    owner = _lock_owner(path)
    if owner and not _is_stale(owner, flocked):
        os.close(descriptor)
        raise ConfigError(_held_message(path, owner))
    if owner:
        log.warning("taking over the lock %s of a run that is gone (%s)", path, _describe(owner))
    record = json.dumps(_this_process(), sort_keys=True) + "\n"
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, record.encode(), 0)
    os.fsync(descriptor)
    lock = RunLock(path, descriptor)
    atexit.register(lock.release)
    return lock


def _open_and_flock(path: Path) -> tuple[int, bool]:
    """An open descriptor of the lock file and whether this process now holds its ``flock``."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise ConfigError(
                f"cannot write the run directory {str(path.parent)!r} ({error.strerror}); set "
                "trainer.default_root_dir to a folder this user can write"
            ) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ConfigError(_held_message(path, _lock_owner(path))) from None
        except OSError:
            # A filesystem without flock (some network mounts): the owner record alone decides.
            return descriptor, False
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            return descriptor, True
        # The previous holder deleted the file between our open and flock: lock the new one instead.
        os.close(descriptor)


def _this_process() -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job": current_slurm_job(),
        "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "started": time.time(),
    }


def _lock_owner(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _is_stale(owner: dict[str, Any], flocked: bool) -> bool:
    if owner.get("host") == socket.gethostname():
        # A live writer on this host would still hold the flock; without flock, ask whether its pid lives.
        return flocked or not _process_alive(int(owner.get("pid", 0)))
    job = current_slurm_job()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    return job is not None and owner.get("slurm_job") == job and int(owner.get("slurm_restart", 0)) < restart


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(owner: dict[str, Any]) -> str:
    job = f", Slurm job {owner['slurm_job']}" if owner.get("slurm_job") else ""
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}{job}"


def _held_message(path: Path, owner: dict[str, Any]) -> str:
    writer = _describe(owner) if owner else "unknown"
    return (
        f"the run directory {str(path.parent)!r} is in use by another run ({writer}): "
        f"two runs in one directory would write the same checkpoints. Wait for it to finish, point this run "
        f"elsewhere with --trainer.default_root_dir, or, if that run is gone, delete {path}"
    )
