"""``sdmoe-train fit|validate|test``: a LightningCLI over :class:`PretrainModule` and :class:`PretrainDataModule`.

``sdmoe-train fit|validate|test --config RECIPE.yaml [--dotted.key=value ...]``; unknown keys and invalid
values are rejected while the recipe is parsed. ``fit`` resumes from the newest valid checkpoint unless told
otherwise (:mod:`sdmoe_train.checkpointing.resume`) and validates once before a fresh run.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI

from sdmoe_train import signals
from sdmoe_train.checkpointing.periodic import PeriodicCheckpoint
from sdmoe_train.checkpointing.recovery import recover_checkpoint_directory
from sdmoe_train.checkpointing.resume import (
    LAST,
    check_checkpoint_matches,
    checkpoint_directories,
    resolve_resume_checkpoint,
    verify_explicit_checkpoint,
)
from sdmoe_train.checkpointing.run_directory import check_writable, derive_run_paths
from sdmoe_train.checkpointing.run_lock import RunLock, acquire_run_lock
from sdmoe_train.checkpointing.wandb_run_id import persist_wandb_run_id
from sdmoe_train.cli.trainer_checks import check_logger_folders, check_trainer_settings
from sdmoe_train.data import PretrainDataModule
from sdmoe_train.errors import ConfigError
from sdmoe_train.lightning.callbacks import NonFiniteGuard, PreemptionHandler
from sdmoe_train.lightning.module import PretrainModule

SUBCOMMANDS = ("fit", "validate", "test")
"""The subcommands LightningCLI parses (it also answers ``--help`` and a missing subcommand)."""


def default_precision(accelerator: Any) -> str:
    """bf16 mixed precision on GPUs; fp32 on CPU, whose lack of bf16 instructions makes autocast ~20x slower."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


class PretrainCLI(LightningCLI):
    """LightningCLI with CPU/GPU precision defaults and a validation pass before training."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--auto_resume",
            type=bool,
            default=True,
            help="fit without --ckpt_path: continue from the newest valid checkpoint in the PeriodicCheckpoint "
            "dirpath (falls back to older ones if the newest is damaged); false always starts afresh",
        )
        parser.add_argument(
            "--validate_before_fit",
            type=bool,
            default=True,
            help="fit: run validation once before the first step (skipped when resuming), to log the initial loss",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would replace the recipe's model section with the checkpoint's hyper-parameters.
        # Here the recipe stays authoritative: PretrainModule reports every difference when the checkpoint
        # is loaded. The file itself is verified first, so damage is named instead of failing in torch.load.
        subcommand = self.config.get("subcommand")
        verify_explicit_checkpoint(self.config[subcommand].get("ckpt_path") if subcommand else None)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse reports a ConfigError raised inside a nested (Optional) dataclass as a
            # ValueError that quotes it; before training starts every such error is bad input.
            raise ConfigError(f"invalid configuration: {error}") from error
        except MisconfigurationException as error:
            # Lightning's own checks of the trainer section (max_steps, limit_*_batches, ...).
            raise ConfigError(f"invalid trainer setting: {error}") from error

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)
        check_trainer_settings(config.trainer)
        check_sequence_length(config.data.corpus.seq_len, config.model.arch.max_seq_len)
        self._run_dir = derive_run_paths(config.trainer)
        check_logger_folders(config.trainer)
        if self.subcommand == "fit":
            persist_wandb_run_id(config.trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        self._run_locks: list[RunLock] = []
        try:
            super()._run_subcommand(subcommand)
        finally:
            for lock in self._run_locks:
                lock.release()

    def before_fit(self) -> None:
        config = self.config.fit
        self._initial_val_loss: float | None = None
        add_default_callbacks(self.trainer)
        if self.trainer.is_global_zero:
            self._claim_run_directory()
        ckpt_path = resolve_resume_checkpoint(self.trainer, config.ckpt_path, config.auto_resume)
        # Before any logger writes: a rejected resume leaves the run directory as it was.
        check_checkpoint_matches(ckpt_path, self.model, self.datamodule)
        self.config_init.fit.ckpt_path = ckpt_path
        if ckpt_path is not None and self.trainer.is_global_zero:
            print(f"resuming from {ckpt_path}")
        if config.validate_before_fit and ckpt_path is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._initial_val_loss = _metric(self.trainer, "val/loss")

    def _claim_run_directory(self) -> None:
        """Rank 0: locks the run directory (and checkpoint folders outside it), then recovers the checkpoint folders."""
        run_dir = self._run_dir.resolve()
        folders = [run_dir]
        for path in checkpoint_directories(self.trainer):
            if path.resolve() != run_dir and run_dir not in path.resolve().parents:
                folders.append(path.resolve())
        for folder in folders:
            self._run_locks.append(acquire_run_lock(folder))
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, PeriodicCheckpoint) and callback.dirpath is not None:
                check_writable(callback.dirpath, "the PeriodicCheckpoint dirpath")
                recover_checkpoint_directory(callback.dirpath, callback.keep_last_k, callback.hash_files)

    def before_validate(self) -> None:
        self._resolve_last("validate")

    def before_test(self) -> None:
        self._resolve_last("test")

    def _resolve_last(self, subcommand: str) -> None:
        # validate/test --ckpt_path last: the newest verified checkpoint, as for fit (never Lightning's guess).
        if self.config[subcommand].ckpt_path == LAST:
            ckpt_path = resolve_resume_checkpoint(self.trainer, LAST, auto_resume=False)
            self.config_init[subcommand].ckpt_path = ckpt_path

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        final = _metric(self.trainer, "val/loss")
        if self._initial_val_loss is not None and final is not None:
            print(f"validation loss: {self._initial_val_loss:.4f} before training -> {final:.4f} after")
        elif final is not None:
            print(f"validation loss after training: {final:.4f}")
        metrics = self.trainer.callback_metrics
        sources = [
            f"{name[len('val/loss/') :]} {float(metrics[name]):.4f}" for name in metrics if name.startswith("val/loss/")
        ]
        if sources:
            print("validation loss per source after training: " + ", ".join(sources))
        best = self.trainer.checkpoint_callback
        if best is not None and best.last_model_path:
            print(f"last checkpoint: {best.last_model_path}")


def check_sequence_length(seq_len: int, max_seq_len: int) -> None:
    """Refuses training examples longer than the model's context, before any data is tokenized or model built.

    Raises:
        ConfigError: If ``data.corpus.seq_len`` exceeds ``model.arch.max_seq_len``.
    """
    if seq_len > max_seq_len:
        raise ConfigError(
            f"data.corpus.seq_len={seq_len} is longer than the model's context, model.arch.max_seq_len={max_seq_len}; "
            f"lower data.corpus.seq_len to at most {max_seq_len} or raise model.arch.max_seq_len"
        )


def add_default_callbacks(trainer: Any) -> None:
    """Adds a default :class:`PreemptionHandler` and :class:`NonFiniteGuard` unless the recipe configures them."""
    for callback_type in (PreemptionHandler, NonFiniteGuard):
        if not any(isinstance(callback, callback_type) for callback in trainer.callbacks):
            trainer.callbacks.append(callback_type())


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the epilog's lines (the other subcommands) kept as written."""


def _metric(trainer: Any, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def run(argv: list[str] | None, epilog: str) -> None:
    """Run LightningCLI on ``argv`` (None: it reads ``sys.argv`` itself), with ``epilog`` under ``--help``.

    For ``fit`` the default preemption signals (USR1, TERM) are held as flags from the start, so none is lost
    or kills the process mid-write. One that arrives while the data is tokenised or the first validation runs
    ends that work at once (:func:`sdmoe_train.signals.interruptible`, PreemptionHandler): the run stops
    before training, with a message and exit code 0, requeued for USR1 inside a Slurm job. One that arrives
    while the model is built stops the run when the data module is set up, at the latest at the start of
    training.
    """
    arguments = sys.argv[1:] if argv is None else argv
    held = [signal.SIGUSR1, signal.SIGTERM] if arguments[:1] == ["fit"] else []
    replaced = signals.install_signal_flags(held)
    try:
        PretrainCLI(
            PretrainModule,
            PretrainDataModule,
            # None: LightningCLI reads sys.argv itself, and warns when given both.
            args=argv,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": epilog, "formatter_class": _HelpFormatter},
        )
    except signals.StopRequested as stop:
        # A clean stop, like one during training (exit 0; PreemptionHandler has requeued for the requeue
        # signal): the interrupted work left nothing half-written and is redone by the next run.
        message = f"stopped before training: {stop}; nothing was trained or saved" if held else f"stopped: {stop}"
        if stop.during == signals.DATA_PREPARATION:
            message += ", and no partial token cache is kept (the next run prepares the data again)"
        print(f"sdmoe-train: {message}", file=sys.stderr)
    finally:
        signals.restore_signal_handlers(replaced)
