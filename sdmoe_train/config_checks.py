"""Checks shared by the typed configs: positive or non-negative finite values, and divisibility with the valid
choices named.

Every numeric check also refuses NaN and infinity: ``nan <= 0`` is false, so a plain comparison lets a NaN
through, and it then surfaces as NaN losses or an exception from deep inside torch.
"""

from __future__ import annotations

import math

from sdmoe_train.errors import ConfigError


def require_positive(owner: str, **values: float | int) -> None:
    """Raise ConfigError naming ``owner.name=value`` for the first value that is not a positive finite number."""
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{owner}.{name}={value} must be positive and finite")


def require_non_negative(owner: str, **values: float | int) -> None:
    """Raise ConfigError naming ``owner.name=value`` for the first value that is negative, NaN or infinite."""
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{owner}.{name}={value} must be >= 0 and finite")


def divisors(n: int) -> str:
    """The divisors of ``n`` as ``"1, 2, 4"``: the valid choices an error message lists."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
