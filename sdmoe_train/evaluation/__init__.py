"""Downstream evaluation with lm-evaluation-harness (the optional ``eval`` extra).

- :mod:`~sdmoe_train.evaluation.adapter`: the lm-eval model ``sdmoe`` over an in-memory model;
- :mod:`~sdmoe_train.evaluation.tasks`: finding tasks (shipped offline tasks, ``--include_path``, lm-eval's);
- :mod:`~sdmoe_train.evaluation.runner`: running them, the results table, ``eval/<task>/<metric>`` metrics,
  the results file;
- :mod:`~sdmoe_train.evaluation.isolation`: evaluating inside a training run without changing it;
- :mod:`~sdmoe_train.evaluation.task_builder`: writing offline tasks from a corpus's held-out documents.

The modules that import ``lm_eval`` are imported only after :func:`require_lm_eval` has checked that it is
installed, so every other part of the framework works without the extra.
"""

from __future__ import annotations

import importlib.util

from sdmoe_train.errors import ConfigError

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
"""The lm-evaluation-harness release the ``eval`` extra pins (and the adapter is tested with)."""


def require_lm_eval(feature: str = "downstream evaluation") -> None:
    """Raises a :class:`ConfigError` with the install command when lm-evaluation-harness is missing.

    Args:
        feature: what needs it, for the message (e.g. ``sdmoe-train evaluate``).
    """
    try:
        found = importlib.util.find_spec("lm_eval") is not None
    except (ImportError, ValueError):  # a module blocked or half-removed from sys.modules
        found = False
    if not found:
        raise ConfigError(
            f"{feature} needs lm-evaluation-harness ({LM_EVAL_REQUIREMENT}), which is not installed; install the "
            'eval extra: pip install -e ".[eval]" (make install does so in a source checkout)'
        )
