"""Downstream evaluation while training: lm-eval tasks every N optimizer steps, logged as ``eval/<task>/<metric>``.

The evaluation runs on the training model itself (no copy, no checkpoint round trip) through the ``sdmoe``
lm-eval model (:mod:`sdmoe_train.evaluation.adapter`), in the run's precision, and leaves the run exactly as it
found it: every global random generator is saved and restored around it, the model goes back to train mode,
no gradient is recorded and no routing bias moves. Training losses are therefore bitwise the same with and
without the callback, and so is a resumed run (the callback's own state, the last evaluated step, is saved in
checkpoints).

Distributed runs: ``distributed="split"`` gives each data-parallel rank a share of the documents and gathers
the per-document metrics on rank 0 (every rank must reach the evaluation, which the step schedule ensures);
``"rank_zero"`` evaluates everything on rank 0 while the other ranks wait at a barrier. Expert-parallel runs
hold only part of the experts on each rank and are refused: evaluate their consolidated checkpoints with
``sdmoe-train evaluate`` instead.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L

from sdmoe_train.data.tokenizer import load_tokenizer
from sdmoe_train.errors import ConfigError
from sdmoe_train.evaluation import require_lm_eval
from sdmoe_train.evaluation.isolation import autocast_dtype, preserved_rng_state
from sdmoe_train.evaluation.options import check_run_options

log = logging.getLogger(__name__)


class DownstreamEvaluation(L.Callback):
    """Runs lm-eval tasks during training and logs their metrics to every logger.

    Args:
        every_n_steps: optimizer steps between evaluations (evaluated after the step that completes them).
        tasks: lm-eval task, group or tag names (the shipped offline ``shakespeare`` by default).
        limit: documents per task (an int) or a share of them (a float below 1); None: all.
        include_path: extra directories of task YAML files (the shipped ``eval_tasks/`` is always searched).
        num_fewshot: examples per prompt; None keeps each task's default.
        batch_size: sequences per forward pass.
        at_train_end: also evaluate when training ends, unless its last step was just evaluated.
        distributed: ``split`` the documents across data-parallel ranks, or evaluate on ``rank_zero`` only.
        tokenizer: tokenizer.json (or its directory) of the model; None uses the data module's tokenizer.
        max_gen_toks: generation length for tasks that set none.
        seed: lm-eval's seed (few-shot example sampling).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        tasks: list[str] | None = None,
        limit: int | float | None = None,
        include_path: list[str] | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 16,
        at_train_end: bool = True,
        distributed: Literal["split", "rank_zero"] = "split",
        tokenizer: str | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"DownstreamEvaluation.every_n_steps={every_n_steps} must be >= 1")
        check_run_options(
            "DownstreamEvaluation.",
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            max_gen_toks=max_gen_toks,
        )
        if distributed not in ("split", "rank_zero"):
            raise ConfigError(f"DownstreamEvaluation.distributed={distributed!r} must be 'split' or 'rank_zero'")
        self.every_n_steps = every_n_steps
        self.tasks = list(tasks) if tasks is not None else ["shakespeare"]
        self.limit = limit
        self.include_path = list(include_path or [])
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.at_train_end = at_train_end
        self.distributed = distributed
        self.tokenizer_path = tokenizer
        self.max_gen_toks = max_gen_toks
        self.seed = seed
        self.last_evaluated_step = -1
        """Optimizer step of the latest evaluation (saved in checkpoints, so a resumed run does not repeat it)."""
        self.last_results: dict[str, Any] | None = None
        """lm-eval's results of the latest evaluation (on global rank 0)."""
        self._resolved: Any = None
        self._tokenizer: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_lm_eval("the DownstreamEvaluation callback")
        parallel = getattr(pl_module, "parallel", None)
        if parallel is not None and parallel.ep_size > 1:
            raise ConfigError(
                f"DownstreamEvaluation cannot run with model.parallel.ep_size={parallel.ep_size} (each rank holds "
                "only its experts); remove the callback and evaluate consolidated checkpoints with "
                "`sdmoe-train evaluate`"
            )
        from sdmoe_train.evaluation.tasks import load_tasks, resolve_tasks

        self._resolved = resolve_tasks(self.tasks, self.include_path)
        load_tasks(self._resolved)  # reads every dataset now: a missing one fails before training, not at step N
        self._tokenizer = self._load_tokenizer(trainer)

    def _load_tokenizer(self, trainer: L.Trainer) -> Any:
        if self.tokenizer_path is not None:
            return load_tokenizer(Path(self.tokenizer_path))
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        if tokenizer is None:
            raise ConfigError(
                "DownstreamEvaluation needs the model's tokenizer: train with PretrainDataModule (its "
                "data.corpus.tokenizer) or set the callback's tokenizer to a tokenizer.json"
            )
        return tokenizer

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs once per micro-batch; evaluate once per completed step.
        if step > 0 and step % self.every_n_steps == 0 and step != self.last_evaluated_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self.last_evaluated_step:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluates the model now and logs the metrics at the current step; returns them (on global rank 0)."""
        from sdmoe_train.evaluation.adapter import SDMoELM
        from sdmoe_train.evaluation.runner import evaluate_tasks, metrics

        step = trainer.global_step
        self.last_evaluated_step = step
        split = self.distributed == "split" and trainer.world_size > 1
        started = time.perf_counter()
        results = None
        if split or trainer.is_global_zero:
            with preserved_rng_state():
                lm = SDMoELM(
                    pl_module.model,
                    self._tokenizer,
                    batch_size=self.batch_size,
                    autocast_dtype=autocast_dtype(trainer.precision, pl_module.device),
                    max_gen_toks=self.max_gen_toks,
                    distributed=split,
                    show_progress=False,
                )
                results = evaluate_tasks(
                    lm,
                    self._resolved,
                    limit=self.limit,
                    num_fewshot=self.num_fewshot,
                    bootstrap_iters=0,
                    seed=self.seed,
                    quiet=True,
                )
        if not split and trainer.world_size > 1:
            trainer.strategy.barrier("downstream_evaluation")
        if not trainer.is_global_zero or results is None:
            return {}
        self.last_results = results
        values = metrics(results)
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        log.info("downstream evaluation at step %d: %.1f s, %s", step, time.perf_counter() - started, values)
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"last_evaluated_step": self.last_evaluated_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_evaluated_step = state_dict["last_evaluated_step"]
