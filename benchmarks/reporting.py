"""Shared output of the benchmark scripts: environment stamp and the JSON file behind ``--out``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, str | None]:
    """What the numbers were measured with.

    ``GLIBC_TUNABLES`` is recorded because on CPU it changes step times: with glibc's defaults, memory freed
    after each step goes back to the OS and the next step page-faults it in again.
    """
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
    }


def write_result(result: dict[str, Any], out: Path | None) -> None:
    """Write ``result`` as indented JSON to ``out`` (creating folders); do nothing when out is None."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
