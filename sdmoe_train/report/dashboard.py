"""Self-contained HTML dashboards of one run, or of several runs side by side, from their logged metrics.

Sources inside a run directory (found recursively, so ``trainer.default_root_dir`` of a recipe works):
``metrics.csv`` of Lightning's ``CSVLogger`` (scalars; one file per attempt of a resumed run, joined) and
``monitor/figures.jsonl`` written by the monitoring callbacks (matrices; the latest step of each is drawn).
The page holds inline SVG only: no script, no external file, viewable offline.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from sdmoe_train.errors import ConfigError
from sdmoe_train.io import write_text_atomically
from sdmoe_train.report.figures import FIGURES_FILE, latest_figures
from sdmoe_train.report.svg import bars_svg, heatmap_svg, line_chart_svg

SECTIONS: tuple[tuple[str, tuple[tuple[str, tuple[str, ...]], ...]], ...] = (
    (
        "Loss",
        (
            ("training loss", ("train/lm_loss",)),
            ("validation loss", ("val/loss",)),
        ),
    ),
    (
        "Parameter spectral overlap (mean sim of expert pairs, top-r singular subspaces)",
        (
            ("proxy W[i] overlap", ("spectral/proxy_overlap_mean",)),
            ("unique W_u[i] overlap (SD-MoE)", ("spectral/unique_overlap_mean",)),
            ("proxy overlap, max pair", ("spectral/proxy_overlap_max",)),
        ),
    ),
    (
        "Gradient-subspace alignment",
        (
            ("gradient alignment (mean over expert pairs)", ("gradient/alignment_mean",)),
            ("gradient energy in the common subspace", ("gradient/common_energy_share",)),
        ),
    ),
    (
        "Gate alignment",
        (
            ("top-direction share, probe hidden states", ("gate/hidden_top1_share",)),
            ("top-direction share, expert input matrices", ("gate/experts_top1_share",)),
            ("|cos| with the top hidden direction", ("gate/hidden_top1_cos",)),
        ),
    ),
    (
        "Routing health",
        (
            ("load entropy / log E", ("routing/load_entropy",)),
            ("coefficient of variation of loads", ("routing/load_cv",)),
            ("max / mean load", ("routing/max_mean_load",)),
            ("dead-expert fraction", ("routing/dead_expert_fraction",)),
        ),
    ),
)
"""Dashboard layout: section title -> (chart title, metric names drawn in it)."""
PER_LAYER_METRICS = (
    "spectral/proxy_gate_left_overlap_mean",
    "spectral/unique_gate_left_overlap_mean",
    "gradient/gate_left_alignment_mean",
    "gate/hidden_top1_share",
    "routing/load_entropy",
)
"""Metrics also drawn layer by layer (one line per layer)."""
PER_SOURCE_METRICS = (
    ("training tokens per source", "data/tokens"),
    ("epochs per source (passes over its data)", "data/epoch"),
    ("validation loss per source", "val/loss"),
)
"""Data-mixture charts: title and metric prefix; one line per source (``<prefix>/<source>``)."""
DOWNSTREAM_PREFIX = "eval/"
"""Metrics of the ``DownstreamEvaluation`` callback, one chart each (task names vary from run to run)."""


@dataclass
class RunLog:
    """What one run logged."""

    label: str
    """Legend name of the run."""
    scalars: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    """Metric -> (step, value) points in step order."""
    figures: dict[str, dict] = field(default_factory=dict)
    """Figure name -> its latest record (``step``, ``values``, ``row_label``, ``column_label``)."""


def read_run(run_dir: Path, label: str | None = None) -> RunLog:
    """Load a run's scalars and latest figures, joined over all its attempts.

    Every start, resume and requeue of a run logs to its own folder (``logs/version_N``). The attempts are
    read oldest first; where a later attempt logs a metric from step ``s`` on, it replaces the earlier
    attempts' points of that metric at ``s`` and after (a resume repeats the steps after its checkpoint).

    Raises:
        ConfigError: the directory does not exist or holds no ``metrics.csv``.
    """
    if not run_dir.is_dir():
        raise ConfigError(f"report: run directory {str(run_dir)!r} does not exist")
    attempts = sorted(run_dir.rglob("metrics.csv"), key=lambda path: path.stat().st_mtime)
    if not attempts:
        raise ConfigError(
            f"report: no metrics.csv under {str(run_dir)!r}; train with the CSVLogger "
            "(trainer.logger: lightning.pytorch.loggers.CSVLogger, as the recipes in recipes/ do)"
        )
    run = RunLog(label or run_dir.name)
    for metrics_file in attempts:
        for name, points in _read_metrics(metrics_file).items():
            first_step = points[0][0]
            kept = [point for point in run.scalars.get(name, []) if point[0] < first_step]
            run.scalars[name] = kept + points
        for name, record in latest_figures(metrics_file.parent / FIGURES_FILE).items():
            if record["step"] >= run.figures.get(name, {"step": -1})["step"]:
                run.figures[name] = record
    return run


def _read_metrics(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    """Metric -> (step, value) points of one ``metrics.csv``, in step order."""
    scalars: dict[str, list[tuple[float, float]]] = {}
    with metrics_file.open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        try:
            if reader.fieldnames is not None and "step" not in reader.fieldnames:
                raise ValueError("it has no 'step' column")
            for row in reader:
                step = float(row["step"])
                for name, value in row.items():
                    if name != "step" and value not in ("", None):
                        scalars.setdefault(name, []).append((step, float(value)))
        except (ValueError, TypeError, UnicodeDecodeError, csv.Error) as error:
            raise ConfigError(
                f"report: {metrics_file} line {reader.line_num} is not a metrics table of Lightning's CSVLogger "
                f"({error}); remove or repair the damaged file"
            ) from error
    for points in scalars.values():
        points.sort()
    return scalars


def _chart(runs: list[RunLog], title: str, metrics: tuple[str, ...]) -> str | None:
    series = {}
    for run in runs:
        for metric in metrics:
            if metric in run.scalars:
                name = run.label if len(metrics) == 1 else f"{run.label}: {metric}"
                series[name] = run.scalars[metric]
    return line_chart_svg(series, title, y_label=metrics[0]) if series else None


def _per_layer_chart(run: RunLog, metric: str) -> str | None:
    layers = sorted(name for name in run.scalars if name.startswith(f"{metric}/layer_"))
    if not layers:
        return None
    series = {name.rsplit("/", 1)[1]: run.scalars[name] for name in layers}
    return line_chart_svg(series, f"{run.label}: {metric}", y_label="per layer")


def _per_source_chart(run: RunLog, title: str, prefix: str) -> str | None:
    sources = sorted(name for name in run.scalars if name.startswith(f"{prefix}/") and name.count("/") == 2)
    if not sources:
        return None
    series = {name.rsplit("/", 1)[1]: run.scalars[name] for name in sources}
    if prefix in run.scalars:
        series["all (mixture-weighted)"] = run.scalars[prefix]
    return line_chart_svg(series, f"{run.label}: {title}", y_label=prefix)


def _figure_svg(record: dict, label: str) -> str:
    title = f"{label}: {record['name']} (step {record['step']})"
    values = record["values"]
    if values and isinstance(values[0], list):
        flat = [value for row in values for value in row if not math.isnan(value)]
        # Similarities and cosines live in [0, 1]; anything else gets its own range.
        high = 1.0 if all(0 <= value <= 1 for value in flat) else max(flat, default=1.0)
        return heatmap_svg(values, title, record["row_label"], record["column_label"], high=high)
    return bars_svg(values, title, record["row_label"], record["column_label"])


def _downstream_metrics(runs: list[RunLog]) -> list[str]:
    """Every ``eval/<task>/<metric>`` logged by ``DownstreamEvaluation`` in any run (standard errors left out)."""
    names = {name for run in runs for name in run.scalars if name.startswith(DOWNSTREAM_PREFIX)}
    return sorted(name for name in names if not name.endswith("_stderr"))


def build_dashboard(runs: list[RunLog], title: str) -> str:
    """The complete HTML page for the given runs."""
    body = [f"<h1>{escape(title)}</h1>"]
    body.append("<p>Runs: " + ", ".join(f"<b>{escape(run.label)}</b>" for run in runs) + ". ")
    body.append(
        "Definitions: <code>docs/monitoring.md</code> (docs/design/sdmoe.md §8). Steps are optimizer steps; "
        "monitors log every <code>every_n_steps</code>.</p>"
    )
    for section, charts in SECTIONS:
        rendered = [svg for chart_title, metrics in charts if (svg := _chart(runs, chart_title, metrics))]
        if rendered:
            body.append(f"<h2>{escape(section)}</h2><div class='row'>{''.join(rendered)}</div>")
    per_source = [
        svg for run in runs for title, prefix in PER_SOURCE_METRICS if (svg := _per_source_chart(run, title, prefix))
    ]
    if per_source:
        body.append(f"<h2>Data mixture</h2><div class='row'>{''.join(per_source)}</div>")
    downstream = [svg for metric in _downstream_metrics(runs) if (svg := _chart(runs, metric, (metric,)))]
    if downstream:
        body.append(f"<h2>Downstream evaluation (lm-eval)</h2><div class='row'>{''.join(downstream)}</div>")
    per_layer = [svg for run in runs for metric in PER_LAYER_METRICS if (svg := _per_layer_chart(run, metric))]
    if per_layer:
        body.append(f"<h2>Per layer</h2><div class='row'>{''.join(per_layer)}</div>")
    for run in runs:
        if not run.figures:
            continue
        body.append(f"<h2>Latest matrices: {escape(run.label)}</h2>")
        groups: dict[str, list[str]] = {}
        for name in sorted(run.figures):
            groups.setdefault(name.split("/")[0], []).append(_figure_svg(run.figures[name], run.label))
        for area, svgs in groups.items():
            body.append(f"<h3>{escape(area)}</h3><div class='row'>{''.join(svgs)}</div>")
    style = "body{font-family:sans-serif;margin:16px} .row{display:flex;flex-wrap:wrap;gap:8px} svg{background:#fff}"
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_dashboard(run_dirs: list[Path], out: Path | None = None, labels: list[str] | None = None) -> Path:
    """Read the runs and write their dashboard.

    Args:
        run_dirs: one or more run directories.
        out: the HTML file; default ``RUN_DIR/report.html`` of the first run.
        labels: legend names, one per run (default: directory names).

    Returns:
        The path written.
    """
    if labels is not None and len(labels) != len(run_dirs):
        raise ConfigError(f"report: --labels has {len(labels)} names for {len(run_dirs)} run directories")
    runs = [read_run(path, None if labels is None else labels[i]) for i, path in enumerate(run_dirs)]
    out = out or run_dirs[0] / "report.html"
    write_text_atomically(out, build_dashboard(runs, "sdmoe-train report: " + " vs ".join(run.label for run in runs)))
    return out
