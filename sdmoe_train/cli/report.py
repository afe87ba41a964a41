"""``sdmoe-train report``: an HTML dashboard of one or more runs from their logged metrics."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.cli.outputs import check_output_file
from sdmoe_train.report.dashboard import write_dashboard

USAGE = """\
  sdmoe-train report RUN_DIR [RUN_DIR ...] [--out FILE.html] [--labels NAME ...]
      loss, spectral overlap, gradient and gate alignment, routing health over time and the latest heatmaps
      of the monitoring callbacks, as one self-contained HTML file (several runs: overlaid)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train report",
        description="Write a self-contained HTML dashboard (inline SVG) from the metrics.csv and monitor figures "
        "of one or more runs.",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run directories (e.g. trainer.default_root_dir)")
    parser.add_argument("--out", type=Path, default=None, help="HTML file (default: FIRST_RUN_DIR/report.html)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend name of each run (default: directory name)")
    return parser


def run(argv: list[str]) -> None:
    """Run ``report`` with its arguments (ConfigError propagates to the caller)."""
    args = _parser().parse_args(argv)
    if args.out is not None:
        check_output_file(args.out, "--out")
    out = write_dashboard(args.run_dirs, args.out, args.labels)
    print(f"wrote {out}")
