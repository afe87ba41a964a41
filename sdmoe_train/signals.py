"""Preemption signals as flags, and the work before training that a held signal may interrupt.

A signal handler here only records which signal arrived. Saving inside the handler would run
collectives and file writes at an arbitrary point of the training step, which is known to deadlock
data-parallel runs; instead :class:`~sdmoe_train.checkpointing.preemption.PreemptionHandler` polls the
flags at the next optimizer-step boundary, where all ranks agree and save together.

Work that can be dropped and redone, such as tokenizing a corpus into a cache that is only renamed into
place when complete, runs inside :func:`interruptible`: there a held signal raises :class:`StopRequested`
at once (as Ctrl-C raises ``KeyboardInterrupt``), so ``scancel`` does not wait hours for the cache to be
finished. This module sits in the lowest layer so that both the data layer and checkpointing can use it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

DATA_PREPARATION = "data preparation"
"""What :func:`interruptible` blocks that tokenize say they do (the message then mentions the token cache)."""

_received: dict[int, int] = {}
"""Signal number -> times received since :func:`install_signal_flags` (written by the handler only)."""
_held: set[int] = set()
"""Signals installed by :func:`install_signal_flags` and not yet restored (Lightning may wrap our handler)."""
_interrupting: str | None = None
"""What the innermost :func:`interruptible` block is doing; None outside of one."""
_interrupted = False
"""Whether the current :func:`interruptible` block has already raised (it raises once; cleanup runs in peace)."""
_owner_pid = os.getpid()
"""The process that entered the current :func:`interruptible` block (its forked workers are not it)."""


class StopRequested(BaseException):
    """A held stop signal ended work that is redone on the next run (data preparation, the first validation).

    A ``BaseException``, like ``KeyboardInterrupt``, so that ``except Exception`` in libraries does not
    swallow it.
    """

    def __init__(self, signum: int, during: str) -> None:
        super().__init__(signum, during)
        self.signum = signal.Signals(signum)
        """The signal that asked to stop."""
        self.during = during
        """What it interrupted, e.g. ``"data preparation"``."""

    def __str__(self) -> str:
        return f"{self.signum.name} received: {self.during} interrupted"


def _record(signum: int, frame: FrameType | None) -> None:
    # Runs between two bytecodes of the main thread: no locks, no I/O, no collectives.
    global _interrupted
    if _interrupting is not None and os.getpid() != _owner_pid:
        # A worker forked inside an interruptible block (a tokenizing process): its parent drops its work,
        # so it ends as the signal asks instead of holding the signal and finishing a shard nobody reads.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received[signum] = _received.get(signum, 0) + 1
    if _interrupting is not None and not _interrupted:
        _interrupted = True
        raise StopRequested(signum, _interrupting)


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
        _held.add(signum)
    return previous


def restore_signal_handlers(previous: dict[signal.Signals, Any]) -> None:
    """Puts back handlers returned by :func:`install_signal_flags` and forgets those signals' flags.

    None stands for a handler installed outside Python; it becomes the default action.
    """
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        _received.pop(signum, None)
        _held.discard(signum)


def received(signum: signal.Signals) -> bool:
    """Whether ``signum`` arrived since its flag was installed."""
    return _received.get(signum, 0) > 0


def holding() -> bool:
    """Whether any signal is held as a flag (every rank of a run holds the same ones)."""
    return bool(_held)


def pending_stop() -> signal.Signals | None:
    """A held signal that has arrived (the first to arrive), or None."""
    return next((signal.Signals(signum) for signum in list(_received) if signum in _held), None)


@contextmanager
def interruptible(during: str) -> Iterator[None]:
    """Lets a held signal end the block at once with :class:`StopRequested` instead of only being recorded.

    Use it only around work whose partial results are discarded when it raises (atomic writes, staging
    directories). Signals that are not held (no :func:`install_signal_flags`) keep their own handlers. A held
    signal that arrived before the block raises on entry. Any error raised while the block unwinds after a
    stop request (a worker pool torn down mid-task) becomes that :class:`StopRequested`. Processes forked
    inside the block end with the signal's default action when they receive it.

    Args:
        during: What the block does, for the message (``"data preparation"``).

    Raises:
        StopRequested: When a held signal arrives before or during the block.
    """
    global _interrupting, _interrupted, _owner_pid
    outer = (_interrupting, _interrupted, _owner_pid)
    _interrupting, _interrupted, _owner_pid = during, False, os.getpid()
    try:
        # Checked after arming: a signal arriving in between is either seen here or raises by itself.
        early = pending_stop()
        if early is not None and not _interrupted:
            _interrupted = True
            raise StopRequested(early, during)
        yield
    except StopRequested:
        raise
    except BaseException as error:
        stop = pending_stop()
        if _interrupted and stop is not None:
            raise StopRequested(stop, during) from error
        raise
    finally:
        # An enclosing block does not raise a second time for the stop this one already raised.
        _interrupting, _interrupted, _owner_pid = outer[0], outer[1] or _interrupted, outer[2]
