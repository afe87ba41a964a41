"""The ``sdmoe-train`` console script.

``sdmoe-train fit|validate|test --config RECIPE.yaml [--dotted.key=value ...]`` is a LightningCLI over
:class:`PretrainModule` and :class:`PretrainDataModule`; ``sdmoe-train prepare --config RECIPE.yaml``
trains the tokenizer (when missing) and builds the token cache of the recipe's ``data`` section without
building a model. Unknown keys and invalid values are rejected while the recipe is parsed.
``sdmoe-train export|import`` convert to and from Hugging Face checkpoints (:mod:`sdmoe_train.hf_cli`);
``sdmoe-train ssmoe-eval`` compares a checkpoint with SSMoE off and on (:mod:`sdmoe_train.ssmoe_cli`).
``sdmoe-train evaluate|build-eval-tasks`` run and build lm-eval tasks (:mod:`sdmoe_train.evaluate_cli`).
``sdmoe-train report RUN_DIR`` writes a run's dashboard (:mod:`sdmoe_train.report.cli`).
"""

from __future__ import annotations

import secrets
import signal
import string
import sys
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI

from sdmoe_train import evaluate_cli, hf_cli, preemption, ssmoe_cli
from sdmoe_train.data import PretrainDataModule, build_token_cache, load_tokenizer, train_corpus_tokenizer
from sdmoe_train.errors import ConfigError, TrainingHaltedError
from sdmoe_train.io import write_text_atomically
from sdmoe_train.io.checkpoints import newest_valid_checkpoint, verify_checkpoint
from sdmoe_train.lightning.callbacks import NonFiniteGuard, PeriodicCheckpoint, PreemptionHandler
from sdmoe_train.lightning.module import PretrainModule
from sdmoe_train.recipe_parser import recipe_data_parser
from sdmoe_train.report import cli as report_cli

USAGE_EPILOG = """\
data preparation:
  sdmoe-train prepare --config RECIPE.yaml [--retrain_tokenizer true]
      train the tokenizer if its file is missing, then tokenize, pack and cache the corpus
"""


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
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and ckpt_path not in _CKPT_PATH_KEYWORDS:
            verify_checkpoint(ckpt_path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse reports a ConfigError raised inside a nested (Optional) dataclass as a
            # ValueError that quotes it; before training starts every such error is bad input.
            raise ConfigError(f"invalid configuration: {error}") from error

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.precision is None:
            config.trainer.precision = default_precision(config.trainer.accelerator)
        if self.subcommand == "fit":
            persist_wandb_run_id(config.trainer)

    def before_fit(self) -> None:
        config = self.config.fit
        self._initial_val_loss: float | None = None
        add_default_callbacks(self.trainer)
        ckpt_path = resolve_resume_checkpoint(self.trainer, config.ckpt_path, config.auto_resume)
        self.config_init.fit.ckpt_path = ckpt_path
        if ckpt_path is not None and self.trainer.is_global_zero:
            print(f"resuming from {ckpt_path}")
        if config.validate_before_fit and ckpt_path is None:
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            self._initial_val_loss = _metric(self.trainer, "val/loss")

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        final = _metric(self.trainer, "val/loss")
        if self._initial_val_loss is not None and final is not None:
            print(f"validation loss: {self._initial_val_loss:.4f} before training -> {final:.4f} after")
        elif final is not None:
            print(f"validation loss after training: {final:.4f}")
        best = self.trainer.checkpoint_callback
        if best is not None and best.last_model_path:
            print(f"last checkpoint: {best.last_model_path}")


def add_default_callbacks(trainer: Any) -> None:
    """Adds a default :class:`PreemptionHandler` and :class:`NonFiniteGuard` unless the recipe configures them."""
    for callback_type in (PreemptionHandler, NonFiniteGuard):
        if not any(isinstance(callback, callback_type) for callback in trainer.callbacks):
            trainer.callbacks.append(callback_type())


def resolve_resume_checkpoint(trainer: Any, ckpt_path: str | None, auto_resume: bool) -> str | None:
    """The checkpoint ``fit`` continues from: ``ckpt_path`` if given, else the newest valid one.

    Raises:
        ConfigError: If checkpoints exist but every auto-resume candidate is damaged.
    """
    if ckpt_path is not None:
        return ckpt_path  # verified while parsing (PretrainCLI._parse_ckpt_path)
    if not auto_resume:
        return None
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, PeriodicCheckpoint) and callback.dirpath is not None:
            newest = newest_valid_checkpoint(callback.dirpath)
            if newest is not None:
                return str(newest)
    return None


_CKPT_PATH_KEYWORDS = ("last", "best", "hpc", "registry")

WANDB_RUN_ID_FILE = "wandb_run_id"
"""File in the run directory holding the W&B run id, so that a requeued or resumed run logs to the same run."""


def persist_wandb_run_id(trainer_config: Any) -> None:
    """Gives a ``WandbLogger`` without an ``id`` the run id stored in the run directory (created once)."""
    loggers = trainer_config.logger if isinstance(trainer_config.logger, list) else [trainer_config.logger]
    for logger in loggers:
        class_path = getattr(logger, "class_path", None)
        if not isinstance(class_path, str) or not class_path.endswith("WandbLogger"):
            continue
        init_args = logger.init_args
        if init_args.get("id") or init_args.get("version"):
            continue
        run_dir = Path(trainer_config.default_root_dir or init_args.get("save_dir") or ".")
        id_file = run_dir / WANDB_RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            # W&B's own id format: 8 lowercase letters and digits.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            write_text_atomically(id_file, run_id + "\n")
        init_args["id"] = run_id


def _metric(trainer: Any, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


def _prepare_parser() -> ArgumentParser:
    parser = recipe_data_parser(
        "sdmoe-train prepare",
        "Train the tokenizer (if missing) and build the token cache for a recipe's data section.",
    )
    parser.add_argument("--retrain_tokenizer", type=bool, default=False, help="retrain even if the file exists")
    return parser


def prepare(argv: list[str]) -> None:
    """``sdmoe-train prepare``: tokenizer training and token-cache building."""
    parser = _prepare_parser()
    config = parser.parse_args(argv)
    corpus = parser.instantiate(config).data.corpus
    tokenizer_path = Path(corpus.tokenizer)
    if config.retrain_tokenizer or not tokenizer_path.exists():
        started = time.perf_counter()
        train_corpus_tokenizer(corpus, tokenizer_path)
        print(
            f"trained a {corpus.vocab_size}-token byte-level BPE tokenizer in {time.perf_counter() - started:.1f} s "
            f"-> {tokenizer_path}"
        )
    if corpus.streaming:
        print("data.corpus.streaming=true: documents are tokenized while training; no token cache to build")
        return
    started = time.perf_counter()
    cache = build_token_cache(corpus, load_tokenizer(tokenizer_path))
    print(
        f"token cache {cache.path} ready in {time.perf_counter() - started:.1f} s: "
        f"{len(cache.train_tokens):,} train / {len(cache.val_tokens):,} validation tokens"
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    replaced_handlers: dict = {}
    try:
        if argv and argv[0] == "prepare":
            prepare(argv[1:])
            return
        if argv and argv[0] in ("export", "import"):
            hf_cli.run(argv[0], argv[1:])
            return
        if argv and argv[0] in ("evaluate", "build-eval-tasks"):
            evaluate_cli.run(argv[0], argv[1:])
            return
        if argv and argv[0] == "ssmoe-eval":
            ssmoe_cli.run(argv[1:])
            return
        if argv and argv[0] == "report":
            report_cli.run(argv[1:])
            return
        if argv and argv[0] == "fit":
            # Held as a flag from now on: a pre-timeout signal that arrives while the model and data are
            # built is acted on at the first step (PreemptionHandler) instead of killing the process.
            replaced_handlers = preemption.install_signal_flags([signal.SIGUSR1])
        PretrainCLI(
            PretrainModule,
            PretrainDataModule,
            # None: LightningCLI reads sys.argv itself, and warns when given both.
            args=None if from_command_line else argv,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={
                "epilog": "".join(
                    (
                        USAGE_EPILOG,
                        hf_cli.USAGE_EPILOG,
                        ssmoe_cli.USAGE_EPILOG,
                        evaluate_cli.USAGE_EPILOG,
                        report_cli.USAGE_EPILOG,
                    )
                )
            },
        )
    except ConfigError as error:
        # Bad user input gets its message, not a traceback through Lightning internals.
        print(f"sdmoe-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except TrainingHaltedError as error:
        print(f"sdmoe-train: training stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    finally:
        preemption.restore_signal_handlers(replaced_handlers)


if __name__ == "__main__":
    main()
