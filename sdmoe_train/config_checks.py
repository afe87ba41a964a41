"""Checks shared by the typed configs: positive values, and divisibility with the valid choices named."""

from __future__ import annotations

from sdmoe_train.errors import ConfigError


def require_positive(owner: str, **values: float | int) -> None:
    """Raise ConfigError naming ``owner.name=value`` for the first value that is not positive."""
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{owner}.{name}={value} must be positive")


def divisors(n: int) -> str:
    """The divisors of ``n`` as ``"1, 2, 4"``: the valid choices an error message lists."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
