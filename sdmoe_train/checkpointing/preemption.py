"""Save at the next step boundary on a preemption signal, then requeue the Slurm job and exit cleanly.

Signal handlers only set flags (:mod:`sdmoe_train.signals`). After every optimizer step all ranks
reduce their flags (one tiny all-reduce), so they agree on the same step even when the signal
reached only some of them. Then every :class:`PeriodicCheckpoint` saves, training stops, and in
``teardown`` rank 0 requeues the job: the requeued run resumes from that checkpoint by auto-resume.

Two signals, two meanings:

* ``requeue_signal`` (default SIGUSR1, what ``sbatch --signal=USR1@SECONDS`` sends before the time
  limit): save, stop, requeue. Slurm may deliver it much earlier than asked; the job then simply
  continues sooner in its next allocation, nothing is lost.
* ``stop_signals`` (default SIGTERM: ``scancel``, preemption with ``PreemptMode=REQUEUE``, node
  shutdown): save and stop without requeueing, leaving the decision to Slurm. Lightning's own SIGTERM
  handler (which broadcasts inside the handler) and its SLURM auto-requeue (which saves inside the
  handler) are switched off for the run.
"""

from __future__ import annotations

import logging
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn

from sdmoe_train import signals
from sdmoe_train.checkpointing import slurm
from sdmoe_train.checkpointing.periodic import PeriodicCheckpoint
from sdmoe_train.errors import ConfigError

log = logging.getLogger(__name__)

_NONE, _STOP, _REQUEUE = 0, 1, 2


class PreemptionHandler(L.Callback):
    """Turns preemption signals into a checkpoint at the next optimizer step, a stop and a requeue.

    Args:
        requeue_signal: Signal that asks for save + requeue (``sbatch --signal``), e.g. ``SIGUSR1``.
        stop_signals: Signals that ask for save + stop without requeueing.
        requeue: ``auto`` requeues when running inside a Slurm job; ``never`` only saves and stops.
        release_requeued: Submit a tiny job that lifts Slurm's ~120 s BeginTime hold of the requeued job.
    """

    def __init__(
        self,
        requeue_signal: str = "SIGUSR1",
        stop_signals: list[str] | None = None,
        requeue: Literal["auto", "never"] = "auto",
        release_requeued: bool = True,
    ) -> None:
        try:
            self.requeue_signal = signals.parse_signal(requeue_signal)
            self.stop_signals = [signals.parse_signal(name) for name in (stop_signals or ["SIGTERM"])]
        except ValueError as error:
            raise ConfigError(f"PreemptionHandler: {error}") from error
        if self.requeue_signal in self.stop_signals:
            raise ConfigError(
                f"PreemptionHandler requeue_signal={self.requeue_signal.name} is also in stop_signals; a signal "
                "either requeues or stops, so remove it from one of them"
            )
        self.requeue = requeue
        self.release_requeued = release_requeued
        self.stopped_for: Literal["requeue", "stop"] | None = None
        self._checked_step = -1
        self._replaced_handlers: dict = {}
        # Installed at once: a signal that arrives while the model is built must not kill the process.
        self._install()

    def _install(self) -> None:
        replaced = signals.install_signal_flags([self.requeue_signal, *self.stop_signals])
        # Keep the handlers from before the first install (the trainer's own are restored by the trainer).
        for signum, handler in replaced.items():
            self._replaced_handlers.setdefault(signum, handler)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            # Lightning's handler saves inside the signal handler; this callback replaces it.
            environment.auto_requeue = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The trainer registered its SIGTERM handler just before training; put the flags back on top.
        self._install()
        # A signal that came while the data was prepared or during the first validation stops the run
        # before its first step: nothing was trained since the last checkpoint, so nothing is saved.
        self._checked_step = trainer.global_step
        request = self._agreed_request(trainer)
        if request != _NONE:
            self.stopped_for = "requeue" if request == _REQUEUE else "stop"
            log.warning("preemption signal before the first step: %s without training", self.stopped_for)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation, or no step since the last check: not a step boundary
        self._checked_step = trainer.global_step
        request = self._agreed_request(trainer)
        if request == _NONE:
            return
        self.stopped_for = "requeue" if request == _REQUEUE else "stop"
        log.warning("preemption signal: saving step %d, then %s", trainer.global_step, self.stopped_for)
        savers = [callback for callback in trainer.checkpoint_callbacks if isinstance(callback, PeriodicCheckpoint)]
        if not savers:
            log.warning("no PeriodicCheckpoint callback is configured: stopping without a checkpoint")
        for callback in savers:
            callback.save_now(trainer)
        trainer.should_stop = True

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        # A validation on its own (fit's first one before training, or `sdmoe-train validate`) has no step to
        # save, so a signal ends it at the next batch, on every rank together, instead of after its last.
        if trainer.state.fn != TrainerFn.VALIDATING:
            return
        request = self._agreed_request(trainer)
        if request != _NONE:
            signum = self.requeue_signal if request == _REQUEUE else self._received_stop_signal()
            raise signals.StopRequested(signum, "validation")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # A signal stopped the run before training (data preparation, the first validation): requeue as a
        # stop during training would; the CLI reports it and exits 0.
        if not isinstance(exception, signals.StopRequested):
            return
        requeue = exception.signum == self.requeue_signal or signals.received(self.requeue_signal)
        self.stopped_for = "requeue" if requeue else "stop"
        self._finish(trainer)

    def _received_stop_signal(self) -> int:
        return next((signum for signum in self.stop_signals if signals.received(signum)), self.stop_signals[0])

    def _agreed_request(self, trainer: L.Trainer) -> int:
        """What the signals received so far ask for, agreed by all ranks (the most drastic request wins)."""
        request = _REQUEUE if signals.received(self.requeue_signal) else _NONE
        if request == _NONE and any(signals.received(signum) for signum in self.stop_signals):
            request = _STOP
        if trainer.world_size > 1:
            flag = torch.tensor([request], device=trainer.strategy.root_device)
            request = int(trainer.strategy.reduce(flag, reduce_op="max").item())
        return request

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            # `fit` validates once before training (a separate `trainer.validate`): a signal received by
            # then must survive until the training loop acts on it.
            return
        self._finish(trainer)

    def _finish(self, trainer: L.Trainer) -> None:
        """Puts the signal handlers back and, when stopped for a requeue, requeues the Slurm job (rank 0)."""
        signals.restore_signal_handlers(self._replaced_handlers)
        self._replaced_handlers = {}
        if self.stopped_for != "requeue" or not trainer.is_global_zero or self.requeue == "never":
            return
        job_id = slurm.current_slurm_job()
        if job_id is None:
            log.warning("stopped for %s but not inside a Slurm job: nothing to requeue", self.requeue_signal.name)
            return
        slurm.requeue_slurm_job(job_id, release=self.release_requeued)
