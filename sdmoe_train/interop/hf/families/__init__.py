"""One adapter per Hugging Face family, one file each; every module here that defines ``ADAPTERS`` is found.

A new family is a new file with an :class:`~sdmoe_train.interop.hf.adapter.HFAdapter` subclass and
``ADAPTERS = (TheAdapter(),)``, plus its tests; nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

from sdmoe_train.errors import ConfigError
from sdmoe_train.interop.hf.adapter import HFAdapter


@cache
def all_adapters() -> tuple[HFAdapter, ...]:
    """Every family adapter, ordered by ``model_type``."""
    adapters: list[HFAdapter] = []
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        adapters.extend(getattr(module, "ADAPTERS", ()))
    return tuple(sorted(adapters, key=lambda adapter: adapter.model_type))


def export_adapters() -> tuple[HFAdapter, ...]:
    """The families a model can be exported as (``sdmoe-train export --arch``)."""
    return tuple(adapter for adapter in all_adapters() if adapter.exportable)


def adapter_for(model_type: str | None) -> HFAdapter:
    """The adapter of a ``config.json`` ``model_type`` or an ``--arch`` name.

    Raises:
        ConfigError: naming the supported types.
    """
    for adapter in all_adapters():
        if adapter.model_type == model_type:
            return adapter
    supported = ", ".join(adapter.model_type for adapter in all_adapters())
    raise ConfigError(f"config.json model_type={model_type!r} is not supported; supported: {supported}")
