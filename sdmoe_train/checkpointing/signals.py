"""Preemption signals as flags.

A signal handler here only records which signal arrived. Saving inside the handler would run
collectives and file writes at an arbitrary point of the training step, which is known to deadlock
data-parallel runs; instead :class:`~sdmoe_train.checkpointing.preemption.PreemptionHandler` polls the
flags at the next optimizer-step boundary, where all ranks agree and save together.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

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


def received(signum: signal.Signals) -> bool:
    """Whether ``signum`` arrived since its flag was installed."""
    return _received.get(signum, 0) > 0
