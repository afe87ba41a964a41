"""Running lm-eval tasks on an :class:`SDMoELM`, and turning its results into a table, metrics and a file.

:func:`evaluate_tasks` is what ``sdmoe-train evaluate`` and the ``DownstreamEvaluation`` callback both call:
lm-eval's ``simple_evaluate`` on the loaded task objects, inside :func:`evaluation_mode` (eval mode, no
gradients, dropless routing). Its result is lm-eval's own results dictionary (``results``, ``groups``,
``configs``, ``versions``, ``n-shot``, ``config`` ...), the same one ``lm_eval --output_path`` writes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.utils import handle_non_serializable, make_table

from sdmoe_train.evaluation.adapter import SDMoELM
from sdmoe_train.evaluation.isolation import evaluation_mode
from sdmoe_train.evaluation.tasks import ResolvedTasks, load_tasks
from sdmoe_train.io import write_text_atomically

METRIC_PREFIX = "eval"
"""Logged metric names are ``eval/<task>/<metric>``."""


def evaluate_tasks(
    lm: SDMoELM,
    tasks: ResolvedTasks,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 100_000,
    seed: int = 0,
    quiet: bool = False,
    log_samples: bool = False,
) -> dict[str, Any] | None:
    """Runs the tasks on the model and returns lm-eval's results (None on data-parallel ranks other than 0).

    Args:
        lm: the model adapter.
        tasks: from :func:`~sdmoe_train.evaluation.tasks.resolve_tasks`.
        limit: documents per task (an int), or a share of them (a float below 1); None: all.
        num_fewshot: examples in each prompt; None keeps each task's own setting (0 for the shipped tasks).
        bootstrap_iters: resamples for the standard errors lm-eval estimates by bootstrap; 0 skips them.
        seed: lm-eval's seed for Python, NumPy, torch and the few-shot sampler (the global generators are
            left seeded; wrap the call in :func:`~sdmoe_train.evaluation.isolation.preserved_rng_state` to
            keep a run's own state).
        quiet: hide lm-eval's progress bars and informational logging.
        log_samples: also return every document's requests and responses (``samples``).
    """
    with evaluation_mode(lm.model), _lm_eval_logging(quiet):
        loaded = load_tasks(tasks)
        return simple_evaluate(
            model=lm,
            tasks=[*loaded["groups"].values(), *_ungrouped(loaded)],
            num_fewshot=num_fewshot,
            batch_size=lm.batch_size,
            device=str(lm.device),
            limit=limit,
            bootstrap_iters=bootstrap_iters,
            log_samples=log_samples,
            task_manager=tasks.manager,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )


def _ungrouped(loaded: dict[str, Any]) -> list[Any]:
    grouped = {task.task_name for group in loaded["groups"].values() for task in group.get_all_tasks()}
    return [task for name, task in loaded["tasks"].items() if name not in grouped]


class _CustomDatasetNotice(logging.Filter):
    """Drops lm-eval's notice, at every task load, that a ``custom_dataset`` can take ``--metadata`` arguments:
    the loader of the tasks written by ``build-eval-tasks`` takes none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextmanager
def _lm_eval_logging(quiet: bool) -> Iterator[None]:
    logger = logging.getLogger("lm_eval")
    level = logger.level
    notice = _CustomDatasetNotice()
    if quiet:
        logger.setLevel(logging.ERROR)
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(notice)
    try:
        yield
    finally:
        task_logger.removeFilter(notice)
        logger.setLevel(level)


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the results (and of the groups, when there are any)."""
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def metrics(results: dict[str, Any], prefix: str = METRIC_PREFIX) -> dict[str, float]:
    """Every numeric metric as ``<prefix>/<task>/<metric>``, for loggers.

    lm-eval keys a metric by ``<metric>,<filter>``; the default filter ``none`` is dropped and any other is
    appended (``exact_match_strict-match``). Standard errors keep their ``_stderr`` suffix; values lm-eval
    could not compute (``"N/A"``) are left out.
    """
    flat: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, values in (results.get(section) or {}).items():
            for key, value in values.items():
                if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                metric, filter_name = key.split(",", 1)
                name = metric if filter_name == "none" else f"{metric}_{filter_name}"
                if math.isfinite(value) or not name.endswith("_stderr"):
                    flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def write_results(results: dict[str, Any], path: str | Path) -> None:
    """Writes lm-eval's results dictionary as JSON (the format of ``lm_eval --output_path``), atomically."""
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    write_text_atomically(path, text + "\n")
