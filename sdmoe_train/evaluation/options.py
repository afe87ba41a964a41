"""Checks of the lm-eval run options shared by ``sdmoe-train evaluate`` and the ``DownstreamEvaluation`` callback."""

from __future__ import annotations

from sdmoe_train.errors import ConfigError


def check_run_options(
    prefix: str,
    *,
    limit: int | float | None,
    num_fewshot: int | None,
    batch_size: int,
    max_gen_toks: int,
    bootstrap_iters: int | None = None,
) -> None:
    """Refuses options lm-eval would misread or fail on late, naming them as ``{prefix}{name}``.

    Args:
        prefix: how the user spells the options: ``--`` on the command line, ``DownstreamEvaluation.`` in a recipe.

    Raises:
        ConfigError: For a limit that is not positive or a fractional count above 1 (lm-eval reads a float
            below 1 as a share and truncates any other), negative few-shot or bootstrap counts, or a batch size
            or generation length below 1.
    """
    if limit is not None and limit <= 0:
        raise ConfigError(f"{prefix}limit={limit} must be > 0 (documents per task, or a share below 1)")
    if limit is not None and limit >= 1 and limit != int(limit):
        raise ConfigError(f"{prefix}limit={limit}: a count of documents per task must be whole, a share below 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"{prefix}num_fewshot={num_fewshot} must be >= 0")
    for name, value in (("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
        if value < 1:
            raise ConfigError(f"{prefix}{name}={value} must be >= 1")
    if bootstrap_iters is not None and bootstrap_iters < 0:
        raise ConfigError(f"{prefix}bootstrap_iters={bootstrap_iters} must be >= 0 (0: no standard errors)")
