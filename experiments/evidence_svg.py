"""Line and bar charts for the evidence study's results page: seed bands, reference lines, a side legend.

:mod:`sdmoe_train.report.svg` draws the dashboards' single-run lines; the study needs a shaded min-max band
over seeds per arm, dashed reference levels (chance, the baseline's final loss) and a legend that stays
readable with seven arms, so it has this small writer of its own (frame and axes from
:func:`~sdmoe_train.report.svg.axes_svg`). Output is plain SVG text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

from sdmoe_train.report.svg import PALETTE, axes_svg

_FONT = 'font-family="sans-serif" font-size="11"'


@dataclass
class Series:
    """One line: points in x order, with an optional band (low, high) per point."""

    label: str
    points: list[tuple[float, float]]
    band: list[tuple[float, float]] = field(default_factory=list)
    dashed: bool = False


def _reference_lines(
    references: Sequence[tuple[str, float]], frame: tuple[float, float, float, float], to_y: Callable[[float], float]
) -> list[str]:
    """Grey dashed horizontal lines across the plot, each labelled at its right end."""
    left, _, plot_width, _ = frame
    parts = []
    for label, level in references:
        y = to_y(level)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#777" '
            'stroke-dasharray="5,4"/>'
        )
        parts.append(
            f'<text x="{left + plot_width - 4}" y="{y - 3:.1f}" text-anchor="end" fill="#555">{escape(label)}</text>'
        )
    return parts


def line_chart(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    references: Sequence[tuple[str, float]] = (),
    y_range: tuple[float, float] | None = None,
    width: int = 640,
    height: int = 300,
) -> str:
    """Lines with shaded bands and dashed horizontal reference levels; legend on the right.

    Args:
        series: the lines (NaN values are skipped).
        title: drawn above the plot.
        x_label: x-axis caption.
        y_label: y-axis caption.
        references: (label, y) levels drawn as grey dashed lines.
        y_range: fixed (low, high); default: the data and references.
        width: picture width in pixels.
        height: picture height in pixels.
    """
    left, right, top, bottom = 58, 190, 26, 42
    plot_width, plot_height = width - left - right, height - top - bottom
    finite = [(x, y) for s in series for x, y in s.points if math.isfinite(y)]
    ys = [y for _, y in finite] + [v for s in series for pair in s.band for v in pair if math.isfinite(v)]
    ys += [y for _, y in references]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>']
    parts.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    parts.append(f'<text x="6" y="16" font-weight="bold">{escape(title)}</text>')
    if not finite:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    x_low, x_high = min(x for x, _ in finite), max(x for x, _ in finite)
    y_low, y_high = y_range or (min(ys), max(ys))
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    pad = 0.04 * (y_high - y_low)
    if y_range is None:
        y_low, y_high = y_low - pad, y_high + pad

    def to_x(x: float) -> float:
        return left + (x - x_low) / ((x_high - x_low) or 1.0) * plot_width

    def to_y(y: float) -> float:
        clipped = min(max(y, y_low), y_high)
        return top + (1 - (clipped - y_low) / (y_high - y_low)) * plot_height

    frame = (left, top, plot_width, plot_height)
    parts += axes_svg(frame, (y_low, y_high), to_y, y_label, ((x_low, x_high), to_x, x_label, 32))
    legend_y = top + 6
    parts += _reference_lines(references, frame, to_y)
    for number, line in enumerate(series):
        color = PALETTE[number % len(PALETTE)]
        pairs = [(x, y) for x, y in line.points if math.isfinite(y)]
        if line.band and len(line.band) == len(line.points):
            upper = [(x, hi) for (x, _), (_, hi) in zip(line.points, line.band, strict=True) if math.isfinite(hi)]
            lower = [(x, lo) for (x, _), (lo, _) in zip(line.points, line.band, strict=True) if math.isfinite(lo)]
            outline = upper + lower[::-1]
            if len(outline) > 2:
                polygon = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in outline)
                parts.append(f'<polygon points="{polygon}" fill="{color}" fill-opacity="0.15" stroke="none"/>')
        dash = ' stroke-dasharray="6,3"' if line.dashed else ""
        if len(pairs) == 1:
            x, y = pairs[0]
            parts.append(f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="3" fill="{color}"/>')
        elif pairs:
            path = " ".join(f"{to_x(x):.1f},{to_y(y):.1f}" for x, y in pairs)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.6"{dash}/>')
        legend_x = left + plot_width + 12
        parts.append(f'<rect x="{legend_x}" y="{legend_y - 4}" width="14" height="3" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 18}" y="{legend_y}">{escape(line.label)}</text>')
        legend_y += 15
    parts.append("</svg>")
    return "".join(parts)


def grouped_bars(
    groups: Sequence[str],
    bars: dict[str, Sequence[float]],
    title: str,
    y_label: str,
    references: Sequence[tuple[str, float]] = (),
    width: int = 640,
    height: int = 300,
) -> str:
    """Bars grouped along x (one group per entry of ``groups``, one bar per key of ``bars``); legend on the right.

    Args:
        groups: group captions, left to right.
        bars: legend label -> one value per group (NaN draws nothing).
        title: drawn above the plot.
        y_label: y-axis caption.
        references: (label, y) dashed levels.
        width: picture width in pixels.
        height: picture height in pixels.
    """
    left, right, top, bottom = 58, 190, 26, 58
    plot_width, plot_height = width - left - right, height - top - bottom
    values = [v for vs in bars.values() for v in vs if math.isfinite(v)] + [y for _, y in references] + [0.0]
    high = max(values) * 1.08 or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" {_FONT}>']
    parts.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    parts.append(f'<text x="6" y="16" font-weight="bold">{escape(title)}</text>')

    def to_y(y: float) -> float:
        return top + (1 - y / high) * plot_height

    frame = (left, top, plot_width, plot_height)
    parts += axes_svg(frame, (0.0, high), to_y, y_label)
    group_width = plot_width / max(len(groups), 1)
    bar_width = group_width * 0.8 / max(len(bars), 1)
    for index, caption in enumerate(groups):
        x = left + (index + 0.5) * group_width
        parts.append(f'<text x="{x:.1f}" y="{top + plot_height + 14}" text-anchor="middle">{escape(caption)}</text>')
    legend_y = top + 6
    for number, (label, heights) in enumerate(bars.items()):
        color = PALETTE[number % len(PALETTE)]
        for index, value in enumerate(heights):
            if not math.isfinite(value):
                continue
            x = left + index * group_width + group_width * 0.1 + number * bar_width
            parts.append(
                f'<rect x="{x:.1f}" y="{to_y(value):.1f}" width="{bar_width * 0.92:.1f}" '
                f'height="{to_y(0.0) - to_y(value):.1f}" fill="{color}"/>'
            )
        legend_x = left + plot_width + 12
        parts.append(f'<rect x="{legend_x}" y="{legend_y - 8}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="{legend_y}">{escape(label)}</text>')
        legend_y += 15
    parts += _reference_lines(references, frame, to_y)
    parts.append("</svg>")
    return "".join(parts)
