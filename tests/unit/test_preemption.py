"""Signal flags: handlers only record, restore puts the old handler back, signal names parse."""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from sdmoe_train import signals
from sdmoe_train.checkpointing import slurm
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


def _trainer_at(step: int) -> SimpleNamespace:
    return SimpleNamespace(global_step=step, world_size=1, should_stop=False, checkpoint_callbacks=[])


def test_a_signal_during_data_preparation_and_first_validation_stops_before_the_first_step() -> None:
    handler = PreemptionHandler(requeue="never", stop_signals=["SIGUSR2"])
    try:
        os.kill(os.getpid(), signal.SIGUSR2)  # arrives while the data is tokenised
        # `fit` validates once before training: its teardown must not forget the signal.
        handler.teardown(_trainer_at(0), None, stage="validate")
        assert signals.received(signal.SIGUSR2)
        trainer = _trainer_at(0)
        handler.on_train_start(trainer, None)
        assert trainer.should_stop and handler.stopped_for == "stop"
    finally:
        handler.teardown(_trainer_at(0), None, stage="fit")
    assert not signals.received(signal.SIGUSR2)


def test_without_a_signal_training_starts() -> None:
    handler = PreemptionHandler(requeue="never", stop_signals=["SIGUSR2"])
    try:
        trainer = _trainer_at(40)
        handler.on_train_start(trainer, None)
        assert not trainer.should_stop and handler.stopped_for is None
    finally:
        handler.teardown(trainer, None, stage="fit")


def _fork_sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(30)
        finally:
            os._exit(0)
    return pid


def test_a_held_signal_ends_an_interruptible_block_at_once_and_only_once() -> None:
    replaced = signals.install_signal_flags([signal.SIGUSR2])
    try:
        started = time.monotonic()
        with pytest.raises(signals.StopRequested) as stop, signals.interruptible("tokenizing"):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(30)
        assert time.monotonic() - started < 10
        assert (stop.value.signum, str(stop.value)) == (signal.SIGUSR2, "SIGUSR2 received: tokenizing interrupted")
        # Outside the block a signal is only recorded, and within the next block it stops at once.
        os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(signals.StopRequested), signals.interruptible("validation"):
            pytest.fail("a signal that arrived before the block must stop it on entry")
    finally:
        signals.restore_signal_handlers(replaced)


def test_an_error_while_an_interrupted_block_unwinds_is_reported_as_the_stop() -> None:
    replaced = signals.install_signal_flags([signal.SIGUSR2])
    try:
        with pytest.raises(TimeoutError), signals.interruptible("tokenizing"):
            raise TimeoutError("an error without a stop request stays itself")
        with pytest.raises(signals.StopRequested) as stop, signals.interruptible("tokenizing"):
            try:
                os.kill(os.getpid(), signal.SIGUSR2)
                time.sleep(30)
            finally:
                raise TimeoutError("a worker pool torn down mid-task")  # what datasets' map raises then
        assert isinstance(stop.value.__cause__, TimeoutError)
    finally:
        signals.restore_signal_handlers(replaced)


def test_a_process_forked_inside_an_interruptible_block_ends_on_the_signal() -> None:
    replaced = signals.install_signal_flags([signal.SIGUSR2])
    try:
        outside = _fork_sleeper()  # like a data-loader worker: holds the signal, as its parent does
        with signals.interruptible("tokenizing"):
            inside = _fork_sleeper()  # like a tokenizing worker
        time.sleep(0.5)  # both children have started sleeping
        for pid in (outside, inside):
            os.kill(pid, signal.SIGUSR2)
        assert os.waitpid(inside, 0)[1] == signal.SIGUSR2  # killed by it, within moments
        time.sleep(0.5)
        assert os.waitpid(outside, os.WNOHANG) == (0, 0), "a child forked outside the block must hold the signal"
        os.kill(outside, signal.SIGKILL)
        os.waitpid(outside, 0)
    finally:
        signals.restore_signal_handlers(replaced)


def test_a_stop_before_training_requeues_for_the_requeue_signal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    requeued: list[str] = []
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setattr(slurm, "requeue_slurm_job", lambda job, release: requeued.append(job))
    trainer = SimpleNamespace(is_global_zero=True)
    for signum, expected in ((signal.SIGUSR2, "stop"), (signal.SIGUSR1, "requeue")):
        handler = PreemptionHandler(requeue_signal="SIGUSR1", stop_signals=["SIGUSR2"])
        handler.on_exception(trainer, None, signals.StopRequested(signum, "data preparation"))
        assert handler.stopped_for == expected
    assert requeued == ["41"]
    assert signal.getsignal(signal.SIGUSR1) is not signals._record, "the handlers were not put back"
