"""Signal flags: handlers only record, restore puts the old handler back, signal names parse."""

from __future__ import annotations

import os
import signal

import pytest

from sdmoe_train.checkpointing import signals, slurm
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks import PreemptionHandler


def test_signal_sets_a_flag_instead_of_terminating_and_restore_forgets_it() -> None:
    original = signal.getsignal(signal.SIGUSR2)
    replaced = signals.install_signal_flags([signal.SIGUSR2])
    try:
        assert not signals.received(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.received(signal.SIGUSR2)
    finally:
        signals.restore_signal_handlers(replaced)
    assert signal.getsignal(signal.SIGUSR2) == original
    assert not signals.received(signal.SIGUSR2)


@pytest.mark.parametrize(("name", "expected"), [("USR1", signal.SIGUSR1), ("sigterm", signal.SIGTERM)])
def test_signal_names_parse_with_or_without_prefix(name: str, expected: signal.Signals) -> None:
    assert signals.parse_signal(name) == expected


def test_a_signal_cannot_both_requeue_and_stop() -> None:
    with pytest.raises(ConfigError, match="requeue_signal=SIGUSR1 is also in stop_signals"):
        PreemptionHandler(requeue_signal="SIGUSR1", stop_signals=["SIGUSR1"])


def test_release_waits_for_pending_then_settles_before_releasing() -> None:
    command = slurm.release_command("123_4")
    pending = command.index("= PENDING")
    assert command.index(f"sleep {slurm.RELEASE_SETTLE_SECONDS}", pending) < command.index("StartTime=now")
    assert "JobId=123_4" in command


def test_array_task_is_requeued_by_its_array_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "900")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "899")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm.current_slurm_job() == "899_3"
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert slurm.current_slurm_job() == "900"
