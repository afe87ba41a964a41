"""Small self-contained SVG charts: line charts, heatmaps and bar charts.

Inline SVG instead of matplotlib: the report and the W&B panels then need no plotting or image library
(none is a dependency of this project), the output is plain text that any browser renders, and a figure
of a tiny run is a few kilobytes that can be committed to the docs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
"""Line colours, one per series in order."""
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
"""Anchor colours of the heatmap scale, low to high (viridis, sampled at 0, ¼, ½, ¾, 1)."""
_FONT = 'font-family="sans-serif" font-size="11"'


def _color(fraction: float) -> str:
    fraction = min(max(fraction, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    low = min(int(fraction), len(_VIRIDIS) - 2)
    weight = fraction - low
    rgb = [round(a + (b - a) * weight) for a, b in zip(_VIRIDIS[low], _VIRIDIS[low + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _number(value: float) -> str:
    return f"{value:.3g}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def axes_svg(
    frame: tuple[float, float, float, float],
    y_range: tuple[float, float],
    to_y: Callable[[float], float],
    y_label: str,
    x_axis: tuple[tuple[float, float], Callable[[float], float], str, float] | None = None,
) -> list[str]:
    """The plot frame, horizontal grid lines with y tick labels, the y caption and optionally an x axis.

    Args:
        frame: (left, top, width, height) of the plot area in pixels.
        y_range: (low, high) of the y axis.
        to_y: data y -> pixel y.
        y_label: y caption, drawn rotated left of the frame.
        x_axis: ((low, high), data x -> pixel x, caption, caption distance below the frame), or None.
    """
    left, top, plot_width, plot_height = frame
    parts = [f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#999"/>']
    for tick in _ticks(*y_range):
        y = to_y(tick)
        parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_number(tick)}</text>')
    if x_axis is not None:
        x_range, to_x, x_label, gap = x_axis
        for tick in _ticks(*x_range):
            x = to_x(tick)
            parts.append(f'<text x="{x:.1f}" y="{top + plot_height + 14}" text-anchor="middle">{_number(tick)}</text>')
        parts.append(
            f'<text x="{left + plot_width / 2}" y="{top + plot_height + gap}" text-anchor="middle">'
            f"{escape(x_label)}</text>"
        )
    parts.append(
        f'<text x="12" y="{top + plot_height / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {top + plot_height / 2})">{escape(y_label)}</text>'
    )
    return parts


def line_chart_svg(
    series: dict[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str = "step",
    y_label: str = "",
    width: int = 460,
    height: int = 260,
) -> str:
    """A line chart of several (x, y) series with axes, ticks and a legend.

    Args:
        series: legend label -> points in x order; NaN y values are skipped.
        title: drawn above the plot.
        x_label: x-axis caption.
        y_label: y-axis caption.
        width: picture width in pixels.
        height: picture height in pixels.

    Returns:
        An ``<svg>`` element.
    """
    left, right, top, bottom = 56, 12, 24, 52
    points = {name: [(x, y) for x, y in values if not math.isnan(y)] for name, values in series.items()}
    xs = [x for values in points.values() for x, _ in values]
    ys = [y for values in points.values() for _, y in values]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>']
    parts.append(f'<text x="{width / 2}" y="15" text-anchor="middle" font-weight="bold">{escape(title)}</text>')
    if not xs:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    plot_width, plot_height = width - left - right, height - top - bottom

    def to_x(x: float) -> float:
        return left + (x - x_low) / ((x_high - x_low) or 1.0) * plot_width

    def to_y(y: float) -> float:
        return top + (1 - (y - y_low) / (y_high - y_low)) * plot_height

    frame = (left, top, plot_width, plot_height)
    parts += axes_svg(frame, (y_low, y_high), to_y, y_label, ((x_low, x_high), to_x, x_label, 28))
    for number, (name, values) in enumerate(points.items()):
        color = PALETTE[number % len(PALETTE)]
        path = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in values)
        if len(values) == 1:
            x, y = values[0]
            parts.append(f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="3" fill="{color}"/>')
        else:
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        legend_x = left + (number % 3) * (plot_width / 3)
        legend_y = height - 8 - 12 * (number // 3)
        parts.append(f'<rect x="{legend_x:.1f}" y="{legend_y - 8}" width="10" height="3" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 14:.1f}" y="{legend_y}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap_svg(
    values: Sequence[Sequence[float]],
    title: str,
    row_label: str = "",
    column_label: str = "",
    low: float = 0.0,
    high: float = 1.0,
    cell: int = 22,
) -> str:
    """A heatmap of a matrix on a fixed [low, high] colour scale (viridis), each cell labelled with its value.

    Args:
        values: rows of the matrix.
        title: drawn above the matrix.
        row_label: what the rows index.
        column_label: what the columns index.
        low: value drawn in the darkest colour.
        high: value drawn in the brightest colour.
        cell: cell size in pixels.

    Returns:
        An ``<svg>`` element.
    """
    rows, columns = len(values), len(values[0]) if values else 0
    left, top = 44, 34
    width = max(left + columns * cell + 60, 8 * len(title) + 20)
    height = top + rows * cell + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>']
    parts.append(f'<text x="4" y="14" font-weight="bold">{escape(title)}</text>')
    parts.append(f'<text x="4" y="28">{escape(row_label)} ↓  {escape(column_label)} →</text>')
    span = (high - low) or 1.0
    for r, row in enumerate(values):
        parts.append(f'<text x="{left - 4}" y="{top + r * cell + cell / 2 + 4}" text-anchor="end">{r}</text>')
        for c, value in enumerate(row):
            fraction = (value - low) / span
            x, y = left + c * cell, top + r * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_color(fraction)}"/>')
            if cell >= 20:
                ink = "#000" if fraction > 0.6 else "#fff"
                parts.append(
                    f'<text x="{x + cell / 2}" y="{y + cell / 2 + 3}" text-anchor="middle" font-size="8" '
                    f'fill="{ink}">{value:.2f}</text>'
                )
    scale_x = left + columns * cell + 12
    for step in range(10):
        y = top + (9 - step) * rows * cell / 10
        parts.append(
            f'<rect x="{scale_x}" y="{y:.1f}" width="10" height="{rows * cell / 10 + 0.5:.1f}" '
            f'fill="{_color((step + 0.5) / 10)}"/>'
        )
    parts.append(f'<text x="{scale_x + 14}" y="{top + 8}">{_number(high)}</text>')
    parts.append(f'<text x="{scale_x + 14}" y="{top + rows * cell}">{_number(low)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(values: Sequence[float], title: str, bar_label: str = "", value_label: str = "", height: int = 160) -> str:
    """A bar chart with a dashed line at the mean (for expert loads: the uniform level).

    Args:
        values: one bar each, in order.
        title: drawn above the bars.
        bar_label: what the bars index.
        value_label: what the bar height is.
        height: picture height in pixels.

    Returns:
        An ``<svg>`` element.
    """
    left, top, bottom, bar = 44, 22, 30, 16
    width = max(left + len(values) * bar + 20, 8 * len(title) + 20)
    plot_height = height - top - bottom
    peak = max(max(values, default=0.0), 1e-12)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>']
    parts.append(f'<text x="4" y="14" font-weight="bold">{escape(title)}</text>')
    for index, value in enumerate(values):
        bar_height = value / peak * plot_height
        x = left + index * bar
        parts.append(
            f'<rect x="{x + 1}" y="{top + plot_height - bar_height:.1f}" width="{bar - 2}" '
            f'height="{bar_height:.1f}" fill="{PALETTE[0]}"/>'
        )
        parts.append(
            f'<text x="{x + bar / 2}" y="{top + plot_height + 12}" text-anchor="middle" font-size="8">{index}</text>'
        )
    if values:
        mean_y = top + plot_height - sum(values) / len(values) / peak * plot_height
        parts.append(
            f'<line x1="{left}" x2="{left + len(values) * bar}" y1="{mean_y:.1f}" y2="{mean_y:.1f}" '
            'stroke="#d62728" stroke-dasharray="4 2"/>'
        )
    parts.append(f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{_number(peak)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + plot_height}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left}" y="{height - 4}">{escape(bar_label)} (bars: {escape(value_label)})</text>')
    parts.append("</svg>")
    return "".join(parts)
