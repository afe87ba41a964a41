"""The monitors' figures file: one JSON record per line of every heatmap or bar chart a monitor publishes.

The monitoring callbacks append to it (:func:`append_figures`); the dashboard reads the latest record of
each figure (:func:`latest_figures`). The file lives here, beside its reader, so that ``report/`` needs
nothing from ``lightning/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

FIGURES_FILE = Path("monitor") / "figures.jsonl"
"""Figures of all monitors, one JSON object per line, under the Trainer's ``log_dir``."""


@dataclass
class Figure:
    """A matrix (heatmap) or vector (bar chart) a monitor publishes next to its scalars."""

    name: str
    """Metric-style name, e.g. ``spectral/proxy_gate/layer_03``."""
    values: Tensor
    """(rows, columns) for a heatmap, (bars,) for a bar chart."""
    row_label: str
    """What the rows (or bars) index, e.g. ``expert``."""
    column_label: str
    """What the columns index (heatmaps), or what the bar height is (bar charts)."""


def append_figures(path: Path, step: int, figures: list[Figure]) -> None:
    """Append one record per figure, at optimizer step ``step``, to the figures file ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        for figure in figures:
            record = {
                "step": step,
                "name": figure.name,
                "values": figure.values.tolist(),
                "row_label": figure.row_label,
                "column_label": figure.column_label,
            }
            stream.write(json.dumps(record) + "\n")


def latest_figures(path: Path) -> dict[str, dict[str, Any]]:
    """The record of the latest step of every figure in a figures file (empty when there is none)."""
    latest: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["step"] >= latest.get(record["name"], {"step": -1})["step"]:
                latest[record["name"]] = record
    return latest
